"""zen_woq_pass: a torch.compile backend for compressed-tensors W4A16 models on AMD EPYC CPUs.

    import torch, zen_woq_pass
    model = zen_woq_pass.keep_compressed(model)     # keep the 4-bit weights packed
    compiled = torch.compile(model, backend="zen_woq")
    compiled(input_ids)
    print(zen_woq_pass.last_report())               # per layer: which kernel, or why not
"""

from zen_woq_pass.backend import zen_woq
from zen_woq_pass.keep_compressed import keep_compressed
from zen_woq_pass.release import release_module_weights
from zen_woq_pass.report import last_report, recent_reports

__all__ = ["keep_compressed", "last_report", "recent_reports", "release_module_weights", "zen_woq"]
