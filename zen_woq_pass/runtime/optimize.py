"""``zen_woq_pass.optimize(model)``: one call from a loaded compressed-tensors model to a fast one.

The life cycle a user should not have to know, in one place: keep the checkpoint compressed (stop
transformers decompressing it), decide each layer's kernel once and hold its weights once
(:mod:`zen_woq_pass.runtime.convert`), let go of the checkpoint file, put the weights a decode step
streams on 2 MB pages (:mod:`zen_woq_pass.runtime.huge_pages`), take over the attention
(:mod:`zen_woq_pass.runtime.attention`), and compile ``generate``'s decode step. After it,
plain ``model(...)`` and ``model.generate(...)`` run the fast path; ``model.zen_woq_report`` says
what each layer runs and why. The name is the one ``ipex.llm.optimize`` and
``zentorch.llm.optimize`` users know.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from zen_woq_pass.graph.keep_compressed import keep_compressed
from zen_woq_pass.graph.rewrite import remember_model
from zen_woq_pass.planning.options import Options
from zen_woq_pass.runtime import attention as zen_attention
from zen_woq_pass.runtime import gemv, huge_pages
from zen_woq_pass.runtime.convert import KernelForward, convert
from zen_woq_pass.runtime.decode import cannot_compile_reason, compile_decode
from zen_woq_pass.runtime.fuse import fuse_siblings
from zen_woq_pass.runtime.head import quantize_head
from zen_woq_pass.runtime.memory import release_checkpoint_file, return_freed_heap

logger = logging.getLogger(__name__)


def optimize(
    model: torch.nn.Module,
    *,
    kernel: str = "auto",
    fuse: bool = True,
    lm_head: str | None = None,
    compile: bool | str = True,
    attention: bool = True,
    mode: str | None = None,
    **inductor_config,
) -> torch.nn.Module:
    """Convert ``model`` in place and return it.

    ``kernel``: "auto", a kernel's name ("zentorch", "avx512-int4", "aten-int4", "dense") or
    "default" (see the backend's options). Every layer runs its 4-bit kernel; a prompt's many rows
    take a dense GEMM where the CPU has bf16 GEMM hardware (:mod:`zen_woq_pass.planning.prefill`),
    and its attention the package's flash-attention kernel where that loads
    (:mod:`zen_woq_pass.runtime.attention`; 3.3x ATen's on a 512-token prompt, a Zen 4).
    ``compile`` (True by default): ``generate``'s decode step is compiled once, on the first
    ``generate`` (:mod:`zen_woq_pass.runtime.decode`: a static KV cache; prefill and plain forwards
    stay eager): dynamo traces one decoder layer for all and Inductor compiles it once
    (:mod:`zen_woq_pass.runtime.layer_regions`). On SmolLM2-135M that decodes 3.5x faster than the
    eager step (a Zen 3) and x1.2 llama.cpp (a Zen 4), for a cold first ``generate`` of 18-26 s, 8 s
    in a second process (README). ``compile=False`` keeps every step eager: no compiler needed, a
    first ``generate`` in about a second. Where Inductor finds no C++ compiler the step stays eager
    and the report says why. ``compile="layers"`` is True (its name from when it was opt-in);
    ``cpp_wrapper=True`` compiles the step as one graph driven from C++, for twice the compile
    time. ``fuse``: sibling projections reading one input (q/k/v, gate/up) share one kernel call
    (:mod:`zen_woq_pass.runtime.fuse`; the same numbers, fewer calls). ``lm_head="int8"`` (or
    ``"int4"``) rounds the dense output Linear to 8 (4) bits too (:mod:`zen_woq_pass.runtime.head`;
    it changes the numbers, so it is opt-in). ``attention=False`` leaves the model's own attention
    (transformers' sdpa) in place. ``mode`` and any other keyword (an Inductor config patch) go to
    the backend. Works on a model fresh from ``from_pretrained``, one transformers already
    decompressed, and one right after llmcompressor's calibration (the fake-quant form).
    """
    if compile not in (False, True, "layers"):
        raise ValueError(f"zen_woq: compile={compile!r} is not one of False, True, 'layers'")
    if compile == "layers" and inductor_config.get("cpp_wrapper"):
        raise ValueError("zen_woq: compile='layers' calls the layers from Inductor's Python wrapper, so not cpp_wrapper=True")
    options = Options.from_user({"kernel": kernel, **inductor_config}, mode)
    if any(hasattr(module, "weight_packed") for module in model.modules()):
        keep_compressed(model)
    if fuse:
        fuse_siblings(model, options)
    report = convert(model, options)
    head_decision = quantize_head(model, lm_head, options) if lm_head is not None else None
    layers = report.layers + ((head_decision,) if head_decision is not None else ())
    report = dataclasses.replace(report, layers=layers, dense_layers=gemv.convert_dense_linears(model))
    released = release_checkpoint_file(model)
    if released:
        logger.info("zen_woq: copied %.1f MB of tensors out of the memory-mapped checkpoint file", released / 1e6)
    report = dataclasses.replace(
        report, pages=huge_pages.move(_streamed_tensors(model)), attention=zen_attention.use(model) if attention else zen_attention.restore(model)
    )
    logger.info("zen_woq: %s; %s", report.pages, report.attention)
    return_freed_heap()
    if not compile:
        decode = "decode: every step eager (compile=False)"
    elif reason := cannot_compile_reason():
        decode = f"decode: every step eager: {reason}; pass compile=False to say so"
        logger.warning("zen_woq: %s", decode)
    else:
        decode = compile_decode(model, {"kernel": kernel, **inductor_config}, mode)
    model.zen_woq_report = dataclasses.replace(report, decode=decode)  # type: ignore[assignment]  # nn.Module's __setattr__ is typed Tensor | Module
    remember_model(model)  # a graph the user compiles later reports the layers it calls
    return model


def _streamed_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a decode step reads once per token: the kernels' constants (those a kernel lets move)
    and the weights of dense Linears computed by ``torch.mv``."""
    tensors = []
    for module in model.modules():
        if isinstance(module, KernelForward) and not module.zen_woq_kernel.constants_movable:
            continue
        if isinstance(module, gemv.GemvForward):
            tensors.append(module.weight)
        tensors += [tensor for name, tensor in module.named_buffers(recurse=False) if name.startswith("zen_woq_")]
    return tensors
