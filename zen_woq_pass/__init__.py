"""zen_woq_pass: a torch.compile backend for compressed-tensors W4A16 models on AMD EPYC CPUs.

    import torch, zen_woq_pass
    model = zen_woq_pass.keep_compressed(model)     # keep the 4-bit weights packed
    compiled = torch.compile(model, backend="zen_woq")
    compiled(input_ids)
    print(zen_woq_pass.last_report())               # per layer: which kernel, or why not
"""

from zen_woq_pass.backend import zen_woq
from zen_woq_pass.keep_compressed import keep_compressed
from zen_woq_pass.report import last_report

__all__ = ["keep_compressed", "last_report", "zen_woq"]
