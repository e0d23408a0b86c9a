"""Tell dynamo up front which sizes of a language model's call vary: the tokens per sequence and
the length of a dynamic KV cache (and of the padding mask that spans it).

Why: dynamo compiles a graph for the sizes it first sees and makes a size symbolic only when a
later call changes it. ``generate`` on a dynamic cache grows the cache by one token per step, so
the first decode step compiled a graph for its one cache length, used once, and the second step
compiled the graph every later step runs: two whole-model compiles (44 s and 53 s for SmolLM2 on
a Zen 3). Marked up front (``maybe_mark_dynamic``: dynamo may still specialize, as it does a size
of 1), the first decode step compiles the graph every step reuses. A hook before the model's
forward marks them, outside any compiled code (inside, marks cannot be made and it does nothing).
"""

from __future__ import annotations

import torch

CACHE_LENGTH, TOKENS = 2, -1  # keys / values [batch, heads, length, head_dim]; ids, mask [batch, tokens]


def _mark(_module, args, kwargs):
    if torch.compiler.is_compiling():
        return None
    for layer in getattr(kwargs.get("past_key_values"), "layers", ()):
        if type(layer).__name__ != "DynamicLayer":  # a static cache's length is fixed
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                torch._dynamo.maybe_mark_dynamic(tensor, CACHE_LENGTH)
    for name in ("input_ids", "attention_mask"):
        tensor = kwargs.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(tensor, TOKENS)
    return None


def mark_on_every_call(model: torch.nn.Module) -> None:
    """Mark the varying sizes before each forward of ``model`` (once per model)."""
    if not getattr(model, "zen_woq_marks_sizes", False):
        model.register_forward_pre_hook(_mark, with_kwargs=True)
        model.zen_woq_marks_sizes = True  # type: ignore[assignment]  # nn.Module's __setattr__ is typed Tensor | Module
