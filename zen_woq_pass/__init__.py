"""zen_woq_pass: compressed-tensors W4A16 models on AMD EPYC CPUs, at 4 bits, through torch.compile.

    import zen_woq_pass
    model = zen_woq_pass.optimize(model)            # a loaded compressed-tensors model
    model.generate(input_ids, max_new_tokens=32)    # plain transformers from here on
    print(model.zen_woq_report)                     # per layer: which kernel, or why not

The lower level: ``keep_compressed(model)`` then ``torch.compile(model, backend="zen_woq")``.
"""

from zen_woq_pass.graph.backend import zen_woq
from zen_woq_pass.graph.keep_compressed import keep_compressed
from zen_woq_pass.planning.report import last_report, recent_reports
from zen_woq_pass.runtime.optimize import optimize

__all__ = ["keep_compressed", "last_report", "optimize", "recent_reports", "zen_woq"]
