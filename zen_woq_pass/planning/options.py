"""The backend's options, from ``torch.compile(..., mode=..., options={...})`` or the environment.

``kernel``: "auto" (the platform decides, walking the kernel chain), a kernel's name to force it
(still subject to the eligibility predicate and the self-check, with the dense fallback after
it), or "default" to replace nothing. ``ZEN_WOQ_KERNEL`` sets the same for code that cannot pass
options. Every other key is an Inductor config patch, passed through to Inductor for the rest of
the graph. ``mode`` means what it means to Inductor (``torch._inductor.list_mode_options``), less
CUDA graphs, which do not exist on CPU: so transformers' ``CompileConfig`` (mode
"reduce-overhead") works as is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from zen_woq_pass.kernels import CHAIN, DENSE, KERNELS

logger = logging.getLogger(__name__)

ENV_KERNEL = "ZEN_WOQ_KERNEL"
AUTO = "auto"
DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class Options:
    kernel: str = AUTO
    inductor_config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        choices = (AUTO, DEFAULT, *KERNELS)
        if self.kernel not in choices:
            raise ValueError(f"zen_woq: kernel={self.kernel!r} is not one of {', '.join(map(repr, choices))}")

    @classmethod
    def from_user(cls, options: dict[str, Any] | None, mode: str | None = None) -> "Options":
        options = dict(options or {})
        kernel = options.pop("kernel", None) or os.environ.get(ENV_KERNEL) or AUTO
        config = {**mode_config(mode), **options}
        return cls(kernel=kernel, inductor_config=tuple(sorted(config.items())))

    @property
    def kernels(self) -> tuple:
        """The kernels to try, in order: the chain, or a forced kernel then the dense fallback."""
        if self.kernel in (AUTO, DEFAULT):
            return CHAIN if self.kernel == AUTO else ()
        return tuple(dict.fromkeys((KERNELS[self.kernel], DENSE)))

    @property
    def forced(self) -> bool:
        """A kernel named by the user: the CPU gate is skipped, never the predicate or self-check."""
        return self.kernel not in (AUTO, DEFAULT)


def mode_config(mode: str | None) -> dict[str, Any]:
    """Inductor's config for a ``torch.compile`` mode, without CUDA graphs (none on CPU)."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    config = list_mode_options(mode)  # raises for an unknown mode, naming the valid ones
    dropped = sorted(key for key in config if "cudagraph" in key)
    if dropped:
        logger.info("zen_woq: mode=%r: %s ignored (no CUDA graphs on CPU)", mode, ", ".join(dropped))
    return {key: value for key, value in config.items() if key not in dropped}
