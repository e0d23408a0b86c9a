"""The decode step of ``generate`` compiled: a static KV cache, prefill left eager.

Why: an eager decode step is about 3 000 aten calls driven from Python, which on SmolLM2-135M cost
about as much as its 4-bit kernels. Compiling the whole forward with transformers' default dynamic
cache gives a graph per prefill length, a dynamic decode graph and recompiles: 145 s of compiling.
transformers compiles the decode step itself when the cache is static and the generation config
carries a ``compile_config`` (on CPU only with ``_compile_all_devices``). Each step then has one
shape, so one graph; its cache length is dynamic, so a longer ``generate`` (a bigger static cache)
reuses it. Prefill, one call per ``generate`` with many tokens, stays eager on the kernels and costs
no compile; so does a plain ``model(...)``.

Dynamo traces one decoder layer for all (:mod:`zen_woq_pass.runtime.layer_regions`), and Inductor compiles
it once too: the step calls the layer's code once per layer, from Inductor's Python wrapper. On
SmolLM2-135M (a Zen 4, 2 threads) a cold first ``generate`` took 18-20 s this way against 45-47 s
for the step compiled whole (Inductor's lowering, scheduling and C++ code generation, once per
layer), and decoded as fast (README). A user's ``cpp_wrapper=True`` compiles the step as one
graph, driven from Inductor's C++ wrapper, which cannot call a region compiled apart (torch 2.13).
That wrapper is built apart from the kernels (``cpp_wrapper_build_separate``), so the two compile
at the same time, and at -O0: at -O1 it took 10 s of a cold compile, at -O0 4 s, for the same
decode speed. Either way the step has no size asserts of Inductor's: dynamo's guards check the
inputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, masking_utils
from transformers.generation.configuration_utils import CompileConfig

from zen_woq_pass.graph.backend import zen_woq
from zen_woq_pass.kernels import native
from zen_woq_pass.runtime import attention, layer_regions

logger = logging.getLogger(__name__)


# The C++ wrapper, built apart at -O0, for a step compiled as one graph (above).
CPP_WRAPPER_CONFIG = {
    "cpp_wrapper": True,
    "cpp_wrapper_build_separate": True,
    "aot_inductor.compile_wrapper_opt_level": "O0",
}


def _step_inductor_config(one_graph: bool) -> dict:
    """No size asserts, ``CPP_WRAPPER_CONFIG`` for ``one_graph``, and no compiler probe that the
    package's own build already made."""
    config = {"size_asserts": False, **(CPP_WRAPPER_CONFIG if one_graph else {})}
    if native.unavailable_reason() is None:
        # Inductor builds ATen's vector headers once per instruction set the CPU has, to see that the
        # compiler can (4 builds, about 7 s of a cold first generate on the Xeon). The same compiler
        # built our AVX512-BF16 library. Its light probes (AMX, BF16 instructions) still run.
        config["cpp.vec_isa_ok"] = True
    return config


def cannot_compile_reason() -> str | None:
    """Why Inductor cannot build CPU code here (no C++ compiler), or None. ``optimize`` compiles
    the decode step by default: without a compiler the first ``generate`` would fail, so it stays
    eager and says so."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # Inductor's InvalidCxxCompiler, or whatever its search raised
        return f"Inductor finds no C++ compiler ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None


def compile_decode(model: torch.nn.Module, backend_options: dict, mode: str | None = None) -> str:
    """Make ``model.generate`` decode through a ``backend="zen_woq"`` graph (in place): its decoder
    layers compiled once, or, with ``cpp_wrapper=True``, the step as one graph called from C++.
    Returns the line the report shows."""
    if model.config._attn_implementation == attention.NAME:
        logger.info("zen_woq: decode step: one query's attention as tensor math (%s)", attention.NAME)
    reused = layer_regions.trace_layers_once(model)
    logger.info("zen_woq: decode step: %d decoder layers reuse another's trace", reused)
    if backend_options.get("cpp_wrapper"):
        line = "decode: generate's step compiled on its first call (static cache), as one graph called from C++ (cpp_wrapper=True)"
    else:
        line = "decode: generate's step compiled on its first call (static cache), each distinct decoder layer once"
    logger.info("zen_woq: %s", line)
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = _our_compile_config()
    model.get_compiled_call = DecodeStep(cast(PreTrainedModel, model), backend_options, mode)  # a transformers model
    if not hasattr(type(model), "create_masks_for_generate"):  # a model's own masks (multimodal) stay
        model.create_masks_for_generate = _padding_mask_for_the_graph
    return line


def _our_compile_config() -> CompileConfig:
    """What ``generate`` hands :class:`DecodeStep` when the user brought no compile config."""
    config = CompileConfig(backend="zen_woq", dynamic=True)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked so
    return config


class DecodeStep:
    """The model's ``get_compiled_call``: transformers asks it for the decode step per ``generate``.

    It compiles on the first ask. A copy of the model (``copy.deepcopy``, pickle) holds a copy of
    this object bound to the copy, and compiles its own step: a step compiled for one model calls
    that model's modules, so it is never copied."""

    def __init__(self, model: PreTrainedModel, backend_options: dict, mode: str | None):
        self.model, self.backend_options, self.mode = model, backend_options, mode
        self._step: Any = None

    def __getstate__(self) -> dict:
        return {**vars(self), "_step": None}

    def __call__(self, compile_config: CompileConfig | None = None):
        """Our step, unless the user's ``generate`` brings a compile config of its own."""
        if compile_config is not None and compile_config.to_dict() != _our_compile_config().to_dict():
            return type(self.model).get_compiled_call(self.model, compile_config)
        if self._step is None:
            self._step = self._compiled()
        return self._step

    def _compiled(self):
        layer_regions.trace_layers_once(self.model)  # a copy's layers were copied as plain ones
        one_graph = bool(self.backend_options.get("cpp_wrapper"))
        options = {**_step_inductor_config(one_graph), **self.backend_options}
        backend = functools.partial(zen_woq, options=options, mode=self.mode)
        # Guards on the modules' attributes took 1.5 ms of a 15 ms step; the weights are checked
        # anyway (the backend's identity guard), and an optimized model is not rebuilt in place.
        skip_module_guards: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        compiled = torch.compile(self.model.__call__, backend=backend, dynamic=True, options=skip_module_guards)
        # Python floats in the step (eps, scaling) are the model's constants: dynamic=True would
        # make them graph inputs, which Inductor cannot take as such, and dynamo would trace it all
        # twice. The patch is made once: making it per call cost 117 us a step, entering it 5 us.
        # For ``one_graph`` dynamo puts the traced layers back into one graph, for the C++ wrapper.
        patched = torch._dynamo.config.patch(specialize_float=True, inline_invoke_subgraph=one_graph)(compiled)

        def decode_step(*args, **kwargs):
            layer_regions.keep_cache_shapes_static(kwargs.get("past_key_values"))
            return patched(*args, **kwargs)

        return decode_step


def _padding_mask_for_the_graph(*, attention_mask, past_key_values, **kwargs):
    """The 2-D padding mask, zero-padded to the static cache's length, for the step to expand itself.

    For a static cache, ``generate`` turns the 2-D mask into the 4-D causal one before every step, in
    eager Python: 0.5-0.7 ms of a 12 ms step on SmolLM2 (about 20 small ops). Given the 2-D mask,
    the model's forward builds the 4-D one itself, inside the compiled step. Padded to the cache's
    length (the slots past the tokens so far are masked either way), it has one length for the
    whole ``generate``: unpadded, the last step, where it fills the cache, compiled a second graph.
    """
    length = past_key_values.get_max_length()
    if (
        attention_mask is None
        or attention_mask.ndim != 2
        or any(past_key_values.is_sliding)
        or not isinstance(length, int)
        or length < attention_mask.shape[-1]
    ):
        return masking_utils.create_masks_for_generate(attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    return F.pad(attention_mask, (0, length - attention_mask.shape[-1]))
