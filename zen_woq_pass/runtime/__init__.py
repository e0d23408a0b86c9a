"""The optimized model: ``optimize`` converts each layer to its plan in the module itself
(``convert``, ``fuse``, ``head``, ``gemv``), chooses prompt and decode paths by fixed rules
(``prefill``, ``attention``), lays out memory (``huge_pages``, ``memory``), and compiles the
decode step (``decode``, ``layer_regions``)."""
