"""What the pass decided for every quantized layer, as plain data: which kernel, or why not.

A report holds no tensors and no graphs, so keeping it keeps no memory alive. ``last_report()``
is the report of the most recent graph ``zen_woq`` compiled; ``model.zen_woq_report`` (set by
:func:`zen_woq_pass.optimize`) is the model's. Both print as a table and render as HTML in Jupyter.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import logging

logger = logging.getLogger(__name__)

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
    held_bytes: int = 0  # what the kernel's constants hold (0 on the default path: the module's own tensors)
    fused_with: str = ""  # the call it shares with its siblings ("q_proj+k_proj+v_proj"), if fused

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def dense_bytes(self) -> int:
        """The same layer as a dense bf16 weight (what transformers holds after decompressing)."""
        return 2 * (self.out_features or 0) * (self.in_features or 0)


@dataclasses.dataclass(frozen=True)
class Report:
    kernel_option: str
    layers: tuple[LayerDecision, ...]
    graph_calls: tuple[str, ...] = ()  # the targets the rewritten graph calls, in order (empty for a model's report)
    dense_layers: tuple[str, ...] = ()  # what optimize chose for the layers left unquantized (the lm_head)
    pages: str = ""  # where optimize put the weights a decode step streams (zen_woq_pass.runtime.huge_pages)
    attention: str = ""  # what computes the attention (zen_woq_pass.runtime.attention)
    decode: str = ""  # how generate's decode step runs: compiled once, or eager and why (optimize)

    def by_kernel(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for layer in self.layers:
            result.setdefault(layer.kernel, []).append(layer.module_path)
        return result

    @property
    def replaced(self) -> list[LayerDecision]:
        """The layers a kernel of the chain runs (not left on the default path)."""
        return [d for d in self.layers if d.kernel != DEFAULT_PATH]

    def count_calls(self, fragment: str) -> int:
        return sum(fragment in target for target in self.graph_calls)

    @property
    def memory_note(self) -> str:
        replaced = self.replaced
        if not replaced:
            return ""
        held, dense = sum(d.held_bytes for d in replaced), sum(d.dense_bytes for d in replaced)
        note = f"memory: the replaced layers hold {held / 1e6:.1f} MB, {held / dense:.2f}x of their dense bf16 {dense / 1e6:.1f} MB"
        densified = [d for d in replaced if d.kernel == "dense"]
        if densified:
            note += f" ({len(densified)} layer(s) no 4-bit kernel takes are held dense, to run as fast as transformers)"
        return note

    @property
    def notes(self) -> list[str]:
        """The lines under the table: memory, pages, attention, the decode step, the dense layers."""
        return [line for line in (self.memory_note, self.pages, self.attention, self.decode, *self.dense_layers) if line]

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
                f"{d.kernel} ({d.fused_with})" if d.fused_with else d.kernel,
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
        lines.extend(self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        note = "".join(f"<p>{html.escape(line)}</p>" for line in self.notes)
        return f"<p>zen_woq report (kernel={html.escape(self.kernel_option)})</p><table><tr>{head}</tr>{body}</table>{note}"


def log(decisions) -> None:
    """One info line per layer: what it runs, and why not the kernels before."""
    for d in decisions:
        logger.info("zen_woq: %s -> %s%s", d.module_path, d.kernel, f" ({d.reason})" if d.reasons else "")


_recent: collections.deque[Report] = collections.deque(maxlen=64)


def record(report: Report) -> None:
    _recent.append(report)


def clear() -> None:
    _recent.clear()


def last_report() -> Report | None:
    """The decisions of the most recent graph compiled by ``backend="zen_woq"`` (None before any)."""
    return _recent[-1] if _recent else None


def recent_reports() -> list[Report]:
    """The reports of the last 64 graphs compiled, oldest first (``generate`` compiles several)."""
    return list(_recent)
