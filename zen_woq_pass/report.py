"""What the pass decided for every quantized layer, as data: which kernel, or why not.

``last_report()`` returns the report of the most recent graph ``zen_woq`` compiled; it prints as
a table and renders as HTML in Jupyter.
"""

from __future__ import annotations

import collections
import dataclasses
import html

import torch.fx as fx

DEFAULT_PATH = "default"


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    module_path: str
    out_features: int | None
    in_features: int | None
    group_size: int | None
    has_zero_point: bool | None
    weight_form: str | None
    kernel: str
    reasons: tuple[str, ...]  # why not each kernel tried before ``kernel`` (or before the default path)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclasses.dataclass
class Report:
    kernel_option: str
    layers: list[LayerDecision]
    graph_module: fx.GraphModule | None = None  # the rewritten graph handed to Inductor
    module_weight_bytes: int = 0  # the replaced layers' own tensors, still held by the model
    kernel_constant_bytes: int = 0  # the same layers packed for their kernels

    def by_kernel(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for layer in self.layers:
            result.setdefault(layer.kernel, []).append(layer.module_path)
        return result

    def rows(self) -> list[tuple[str, ...]]:
        def show(value):
            return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

        return [
            (
                d.module_path,
                f"{show(d.out_features)}x{show(d.in_features)}",
                show(d.group_size),
                show(d.has_zero_point),
                show(d.weight_form),
                d.kernel,
                d.reason,
            )
            for d in self.layers
        ]

    HEADER = ("layer", "out x in", "group", "zero point", "form", "kernel", "why not the kernels before")

    def __str__(self) -> str:
        rows = [self.HEADER, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER) - 1)]
        lines = [f"zen_woq report (kernel={self.kernel_option}): {len(self.layers)} quantized linear(s)"]
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if self.memory_note:
            lines.append(self.memory_note)
        return "\n".join(lines)

    @property
    def memory_note(self) -> str:
        if not (self.module_weight_bytes and self.kernel_constant_bytes):
            return ""
        return (
            f"memory: the model still holds the replaced layers' packed weights ({self.module_weight_bytes / 1e6:.1f} MB) "
            f"beside the kernels' copy ({self.kernel_constant_bytes / 1e6:.1f} MB); once compiled, "
            "zen_woq_pass.release_module_weights(model) frees the model's copy (inference only)"
        )

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        note = f"<p>{html.escape(self.memory_note)}</p>" if self.memory_note else ""
        return f"<p>zen_woq report (kernel={html.escape(self.kernel_option)})</p><table><tr>{head}</tr>{body}</table>{note}"


_recent: collections.deque[Report] = collections.deque(maxlen=64)


def record(report: Report) -> None:
    _recent.append(report)


def last_report() -> Report | None:
    """The decisions of the most recent graph compiled by ``backend="zen_woq"`` (None before any)."""
    return _recent[-1] if _recent else None


def recent_reports() -> list[Report]:
    """The reports of the last 64 graphs compiled, oldest first (``generate`` compiles several)."""
    return list(_recent)
