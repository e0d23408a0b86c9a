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

# Modules users were shown by their flat names before the sub-packages (README, the notebook):
# ``zen_woq_pass.attention.restore(model)``, ``from zen_woq_pass import measure, platform, smollm2``.
_MOVED = {
    "attention": "zen_woq_pass.runtime.attention",
    "measure": "zen_woq_pass.models.measure",
    "platform": "zen_woq_pass.planning.platform",
    "smollm2": "zen_woq_pass.models.smollm2",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'zen_woq_pass' has no attribute {name!r}")
