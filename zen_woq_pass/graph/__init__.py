"""The graph pass behind ``backend="zen_woq"``: keep a checkpoint packed so dynamo can trace it
(``keep_compressed``), find its quantized linears in a captured graph by meaning (``match``),
replace each with its plan's kernel (``rewrite``), and hand the rest to Inductor (``backend``)."""
