"""``backend="zen_woq"``: the pass, then Inductor for everything else, behind an identity guard.

Dynamo hands module parameters to backends as graph inputs, without guards on which tensors they
are (it shares one compiled graph between instances of a module class). We fold their values into
the compiled code, like Inductor's ``freezing``; so we guard them ourselves: each call checks that
the inputs we folded are the very tensors we folded. Another model gets its own rewritten variant,
compiled on first use; past ``MAX_VARIANTS`` it gets the default path. After a variant's first
call, the kept modules it replaced take their plans (:func:`zen_woq_pass.convert.adopt_compiled`):
the model then holds its weights once, and dynamo recompiles once, onto modules that call their
kernels directly. ``torch._dynamo.reset()`` clears every cache of this package (:func:`reset`).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from zen_woq_pass import choose, convert, gemv, plan, platform, prefill, selfcheck
from zen_woq_pass import report as report_module
from zen_woq_pass.options import DEFAULT, Options
from zen_woq_pass.rewrite import rewrite

logger = logging.getLogger(__name__)

MAX_VARIANTS = 8


def zen_woq(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The dynamo backend: ``torch.compile(model, backend="zen_woq", mode=..., options={"kernel": ...})``."""
    return _GuardedGraph(gm, list(example_inputs), Options.from_user(options, mode))


def reset() -> None:
    """Forget every decision, report and probe of this process (``torch._dynamo.reset()`` calls it)."""
    plan.clear()
    selfcheck.clear()
    gemv.clear()
    prefill.clear()
    choose.clear()
    report_module.clear()
    platform.clear_caches()


zen_woq.reset = reset


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh graph over the same root: each variant rewrites its own copy."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


class _GuardedGraph:
    """Compiled variants of one captured graph, keyed by the identity of the folded inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: Options):
        self.original, self.options = gm, options
        self.variants: list[tuple[tuple[int, ...], tuple[weakref.ref, ...], object]] = []
        self.fallback = None
        self.to_adopt: tuple = ()
        self._add_variant(example_inputs)

    def _compile(self, inputs, options: Options):
        gm, report, folded, used = rewrite(_copy(self.original), inputs, options)
        report_module.record(report)
        self.to_adopt += used
        return compile_fx(gm, inputs, config_patches=dict(options.inductor_config)), folded

    def _add_variant(self, inputs):
        compiled, folded = self._compile(inputs, self.options)
        self.variants.append((folded, tuple(weakref.ref(inputs[i]) for i in folded), compiled))
        return compiled

    def _default_path(self, inputs):
        if self.fallback is None:
            logger.warning("zen_woq: more than %d models share one graph; the rest run on the default path", MAX_VARIANTS)
            self.fallback, _ = self._compile(inputs, dataclasses.replace(self.options, kernel=DEFAULT))
        return self.fallback

    def _select(self, args):
        for folded, refs, compiled in self.variants:
            if all(ref() is args[i] for i, ref in zip(folded, refs)):
                return compiled
        if len(self.variants) < MAX_VARIANTS:
            logger.info("zen_woq: new constants for a compiled graph (another model?); compiling a variant")
            return self._add_variant(list(args))
        return self._default_path(list(args))

    def __call__(self, *args):
        result = self._select(args)(*args)
        if self.to_adopt:  # after the call: the compiled code has read the tensors it takes from the modules
            adopt, self.to_adopt = self.to_adopt, ()
            convert.adopt_compiled(adopt)
        return result
