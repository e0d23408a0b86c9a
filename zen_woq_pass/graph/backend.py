"""``backend="zen_woq"``: the pass, then Inductor for everything else, behind an identity guard.

A language model's prompt graph (more than one token per sequence) is not handed to Inductor: it
runs once per ``generate``, on the 4-bit kernels the pass put in, as the rewritten graph
(:func:`_many_tokens`); a decode step's graph is compiled. A kept model's decoder layers share one
trace (``keep_compressed`` makes them nested compile regions), which cannot hold each layer's packed
weights as constants: the first such graph runs once as traced, then the model is converted as
``optimize`` converts it and dynamo traces again onto its kernels (:func:`_convert`).

Dynamo hands module parameters to backends as graph inputs, without guards on which tensors they
are (it shares one compiled graph between instances of a module class). We fold their values into
the compiled code, like Inductor's ``freezing``; so we guard them ourselves: each call checks that
the inputs we folded are the very tensors we folded. Another model gets its own rewritten variant,
compiled on first use; past ``MAX_VARIANTS`` it gets the default path. After a variant's first
call, the kept modules it replaced take their plans (:func:`zen_woq_pass.runtime.convert.adopt_compiled`):
the model then holds its weights once, and dynamo recompiles once, onto modules that call their
kernels directly. ``torch._dynamo.reset()`` clears every cache of this package (:func:`reset`).

Dynamo keeps what a backend returns until ``torch._dynamo.reset()``, model or no model (its cache
hangs on the code object, shared by every instance of the class). Plain Inductor holds no module
tensor there: they are inputs. A variant holds folded constants, so it lives only as long as the
tensors it folded: when one of them dies (the model is deleted) the variant is dropped, and the
constants with it (Inductor's code holds reference cycles: the garbage collector's next pass). The backend returns a plain function over the variants, not an object: dynamo
copies the ``__dict__`` of what it wraps, which would keep a snapshot of it alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
import weakref

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from zen_woq_pass.graph.keep_compressed import kept_model
from zen_woq_pass.graph.rewrite import remember_model, rewrite
from zen_woq_pass.kernels import int4pack
from zen_woq_pass.planning import plan, platform, prefill, selfcheck
from zen_woq_pass.planning import report as report_module
from zen_woq_pass.planning.options import DEFAULT, Options
from zen_woq_pass.runtime import convert, fuse

logger = logging.getLogger(__name__)

MAX_VARIANTS = 8
_advised = False  # the decode-step advice was logged (:func:`_advise_once`)
EMBEDDINGS = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)


def zen_woq(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The dynamo backend: ``torch.compile(model, backend="zen_woq", mode=..., options={"kernel": ...})``."""
    guarded = _GuardedGraph(gm, list(example_inputs), Options.from_user(options, mode))

    def compiled(*args):
        return guarded(*args)

    return compiled


def reset() -> None:
    """Forget every decision, report and probe of this process (``torch._dynamo.reset()`` calls it)."""
    plan.clear()
    selfcheck.clear()
    prefill.clear()
    report_module.clear()
    platform.clear_caches()


zen_woq.reset = reset  # type: ignore[attr-defined]  # mypy knows no function attributes; dynamo calls a backend's reset()


def _token_embeddings(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The example values of ``gm``'s token embeddings: [..., tokens, hidden] in a language model."""
    values = (
        node.meta.get("example_value", node.meta.get("val")) for node in gm.graph.nodes if node.op == "call_function" and node.target in EMBEDDINGS
    )
    return [value for value in values if isinstance(value, torch.Tensor) and value.dim() >= 3]


def _many_tokens(embedding: torch.Tensor) -> bool:
    """More than one token per sequence: a prompt. A decode step's count is the constant 1 (dynamo
    specializes a size of 1); a prompt's is another constant or a symbol.

    A prompt's graph runs once per ``generate``, where the 4-bit kernels and GEMMs carry the time
    and Inductor's fusions save little, while compiling it took 45-62 s for SmolLM2 on a Zen 3, paid
    again for each new prompt shape. So it runs as the pass left it, on the kernels, as
    ``optimize``'s prompts run eagerly."""
    tokens = embedding.shape[-2]
    return not (isinstance(tokens, int) and tokens == 1)


def _advise_once(seconds: float) -> None:
    """One line, once per process: a decode step compiled layer by layer, and the faster way in."""
    global _advised
    if not _advised:
        _advised = True
        logger.warning(
            "zen_woq: this decode step compiled each decoder layer on its own (%.0f s here); on a static KV cache "
            "(generate's default after keep_compressed(model)) one layer is traced and compiled for all, and "
            "zen_woq_pass.optimize(model) also fuses projections and takes over the attention",
            seconds,
        )


def _kept_models_in_regions(inputs, folded: tuple[int, ...], options: Options) -> list[torch.nn.Module]:
    """The kept models whose packed layers the graph reads but the pass did not fold: inside nested
    compile regions (:mod:`zen_woq_pass.runtime.layer_regions`), where one trace serves every
    decoder layer and cannot hold each layer's weights as constants. A model converted before is
    not listed again: what no kernel took stays on the default path."""
    if options.kernel == DEFAULT:
        return []
    found: dict[int, torch.nn.Module] = {}
    for index, value in enumerate(inputs):
        model = kept_model(value) if isinstance(value, torch.Tensor) and index not in folded else None
        if model is not None and model not in _converted:
            found[id(model)] = model
    return list(found.values())


_converted: weakref.WeakSet = weakref.WeakSet()  # the kept models :func:`_convert` converted


def _convert(model: torch.nn.Module, options: Options) -> None:
    """Give a kept model's layers their kernels in the modules, as ``optimize`` does (sibling
    projections fused, one copy of the weights); dynamo then traces its graphs again onto them."""
    _converted.add(model)
    activation_dtype = convert.activation_dtype_of(model)
    fuse.fuse_siblings(model, options, activation_dtype)
    report = convert.convert(model, options, activation_dtype)
    remember_model(model)  # the graphs traced from now on report the layers they call
    fused = sum(bool(d.fused_with) for d in report.replaced)
    logger.info("zen_woq: a kept model's %d quantized layers took their kernels (%d in fused calls)", len(report.replaced), fused)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh graph over the same root: each variant rewrites its own copy."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


class _GuardedGraph:
    """Compiled variants of one captured graph, keyed by the identity of the folded inputs; each
    held while those inputs live."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: Options):
        self.original, self.options = gm, options
        # token -> (indices of the folded inputs, weak references to them, compiled code)
        self.variants: dict[int, tuple[tuple[int, ...], tuple[weakref.ref, ...], object]] = {}
        self.fallback = None
        self.to_adopt: list = []
        self.to_convert: list[torch.nn.Module] = []
        self._tokens = itertools.count()
        self._add_variant(example_inputs)

    def _compile(self, inputs, options: Options):
        gm, report, folded, used = rewrite(_copy(self.original), inputs, options)
        report_module.record(report)
        self.to_adopt += used
        regions = any(node.target is torch.ops.higher_order.invoke_subgraph for node in gm.graph.nodes)
        models = _kept_models_in_regions(inputs, folded, options) if regions else []
        if models:
            logger.info(
                "zen_woq: this graph's decoder layers share one trace, which cannot hold each layer's packed weights: "
                "it runs once as traced (compressed-tensors' math, no compile), then the model's layers take their "
                "kernels and dynamo traces again onto them"
            )
            self.to_convert += models
            return gm, folded
        on_kernels = bool(report.replaced)
        embeddings = _token_embeddings(gm)
        if on_kernels and any(_many_tokens(e) for e in embeddings):
            logger.info("zen_woq: a prompt's graph runs on its kernels without Inductor (once per generate: no compile)")
            return gm, folded
        start = time.perf_counter()
        with int4pack.called_as_is_by_inductor() if regions else contextlib.nullcontext():
            compiled = compile_fx(gm, inputs, config_patches=dict(options.inductor_config))
        if on_kernels and embeddings and not regions and not dict(options.inductor_config).get("cpp_wrapper"):
            _advise_once(time.perf_counter() - start)
        return compiled, folded

    def _add_variant(self, inputs):
        compiled, folded = self._compile(inputs, self.options)
        token, guarded = next(self._tokens), weakref.ref(self)

        def drop(_):  # a folded input died: its model is gone, so the constants folded from it go too
            live = guarded()
            if live is not None:
                live.variants.pop(token, None)

        self.variants[token] = (folded, tuple(weakref.ref(inputs[i], drop) for i in folded), compiled)
        return compiled

    def _default_path(self, inputs):
        if self.fallback is None:
            logger.warning("zen_woq: more than %d models share one graph; the rest run on the default path", MAX_VARIANTS)
            self.fallback, _ = self._compile(inputs, dataclasses.replace(self.options, kernel=DEFAULT))
        return self.fallback

    def _select(self, args):
        for folded, refs, compiled in list(self.variants.values()):
            if all(ref() is args[i] for i, ref in zip(folded, refs)):
                return compiled
        if len(self.variants) < MAX_VARIANTS:
            logger.info("zen_woq: new constants for a compiled graph (another model?); compiling a variant")
            return self._add_variant(list(args))
        return self._default_path(list(args))

    def __call__(self, *args):
        result = self._select(args)(*args)
        if self.to_adopt:  # after the call: the compiled code has read the tensors it takes from the modules
            adopt = tuple(self.to_adopt)
            self.to_adopt.clear()
            convert.adopt_compiled(adopt)
        while self.to_convert:
            _convert(self.to_convert.pop(), self.options)
        return result
