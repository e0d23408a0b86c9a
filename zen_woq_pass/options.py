"""The backend's options, from ``torch.compile(..., options={...})`` or the environment.

``kernel``: "auto" (the platform decides, walking the kernel chain), a kernel's name to force it
(still subject to the eligibility predicate and the self-check), or "default" to replace nothing.
``ZEN_WOQ_KERNEL`` sets the same for code that cannot pass options. Every other key is an
Inductor config patch, passed through to Inductor for the rest of the graph.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from zen_woq_pass.kernels import CHAIN, KERNELS

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
    def from_user(cls, options: dict[str, Any] | None) -> "Options":
        options = dict(options or {})
        kernel = options.pop("kernel", None) or os.environ.get(ENV_KERNEL) or AUTO
        return cls(kernel=kernel, inductor_config=tuple(sorted(options.items())))

    @property
    def kernels(self) -> tuple:
        """The kernels to try, in order."""
        return CHAIN if self.kernel == AUTO else () if self.kernel == DEFAULT else (KERNELS[self.kernel],)

    @property
    def forced(self) -> bool:
        """A kernel named by the user: the CPU gate is skipped, never the predicate or self-check."""
        return self.kernel not in (AUTO, DEFAULT)
