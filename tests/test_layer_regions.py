"""``compile=True`` traces one decoder layer for all (``zen_woq_pass.runtime.layer_regions``): the tokens of
the eager reference but for near-ties, the second layer stamped out from the first's trace, every
layer's own KV cache slot written, layers that differ traced apart; Inductor compiles the layer once
and the step calls it from Python, aten-int4 layers too."""

import collections
import threading

import pytest
import torch
from torch._dynamo.utils import compilation_time_metrics
from torch._inductor import config as inductor_config
from torch._inductor import lowering
from torch._inductor.codecache import compiled_fx_graph_hash
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes
from torch._inductor.utils import run_and_get_code

import zen_woq_pass
from zen_woq_pass.kernels import int4pack
from zen_woq_pass.models.measure import compare_greedy, greedy
from zen_woq_pass.planning.options import Options
from zen_woq_pass.runtime import convert, gemv, layer_regions

from helpers import INPUT_IDS, KERNEL_CALLS, NEW_TOKENS, assert_same_greedy, four_bit_kernels_here, load, load_reference


def _stamped_out_layers() -> int:
    return len(compilation_time_metrics.get("invoke_subgraph_reuse_stamp_out", []))


def _generate_counting_stamp_outs(model, ids):
    before = _stamped_out_layers()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    return out, _stamped_out_layers() - before


def test_the_second_layer_reuses_the_first_layers_trace_and_writes_its_own_cache(checkpoints):
    path = checkpoints("llama_sym_g128")
    ids = INPUT_IDS[:1]
    reference = greedy(load_reference(path), ids, NEW_TOKENS)
    model = zen_woq_pass.optimize(load(path, keep=False), compile=True)
    assert [type(layer).__name__ for layer in model.model.layers] == ["RegionLlamaDecoderLayer"] * 2
    torch._dynamo.reset()
    out, stamped = _generate_counting_stamp_outs(model, ids)
    assert stamped == 1  # two layers: one traced, one stamped out
    assert_same_greedy(path, model, ids, out.sequences[:, ids.shape[1] :], reference)
    slots = out.past_key_values.layers
    assert [int(slot.cumulative_length) for slot in slots] == [ids.shape[1] + NEW_TOKENS - 1] * 2
    written = ids.shape[1] + NEW_TOKENS - 1
    assert all(bool(slot.keys[:, :, :written].abs().sum(-1).gt(0).all()) for slot in slots)
    assert not torch.equal(slots[0].keys, slots[1].keys)  # each layer wrote its own slot


def test_layers_alike_share_a_structure_and_layers_that_differ_do_not(checkpoints):
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False))
    first, second = model.model.layers
    assert layer_regions.decoder_layers(model) == [first, second]
    assert layer_regions.structure(first) == layer_regions.structure(second)  # their layer_idx differs
    second.self_attn.scaling = first.self_attn.scaling / 2
    assert layer_regions.structure(first) != layer_regions.structure(second)
    handle = first.mlp.register_forward_hook(lambda *args: None)
    assert layer_regions.structure(first) is None  # a hook's effect cannot be compared
    handle.remove()


def test_a_layer_converted_unlike_the_others_does_not_reuse_their_trace(checkpoints):
    """keep_compressed makes the layers regions while they are packed; a layer whose Linears took
    their kernels since (one converted, one not) must trace apart: the package takes the layers'
    reuse hash again whenever it changes their modules."""
    model = load(checkpoints("llama_sym_g128"))
    first, second = model.model.layers
    assert isinstance(first, layer_regions.RegionForward) and first.zen_woq_structure == second.zen_woq_structure
    convert.convert(second, Options.from_user({"kernel": "auto"}), torch.bfloat16)
    assert first.zen_woq_structure != second.zen_woq_structure
    convert.convert(first, Options.from_user({"kernel": "auto"}), torch.bfloat16)
    assert first.zen_woq_structure == second.zen_woq_structure


def test_layers_that_return_more_than_a_tensor_keep_their_forward(checkpoints):
    model = load(checkpoints("llama_sym_g128"), keep=False)  # layers as they are: keep_compressed not called yet
    layer_class = type(model.model.layers[0])

    def forward(self, hidden_states, **kwargs) -> tuple:
        return (layer_class.forward(self, hidden_states, **kwargs),)

    for layer in model.model.layers:
        layer.__class__ = type("TupleLayer", (layer_class,), {"forward": forward})
    zen_woq_pass.optimize(model, compile=False)
    assert layer_regions.trace_layers_once(model) == 0
    assert not any(isinstance(layer, layer_regions.RegionForward) for layer in model.model.layers)
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), compile=False)
    assert layer_regions.trace_layers_once(model) == 1


def test_a_layer_that_differs_is_traced_on_its_own(checkpoints):
    path = checkpoints("llama_sym_g128")
    ids = INPUT_IDS[:1]
    reference = greedy(load_reference(path), ids, NEW_TOKENS)
    model = load(path, keep=False)
    model.model.layers[1].mlp.zen_woq_note = "not like layer 0"
    zen_woq_pass.optimize(model, compile=True)
    torch._dynamo.reset()
    out, stamped = _generate_counting_stamp_outs(model, ids)
    assert stamped == 0
    assert_same_greedy(path, model, ids, out.sequences[:, ids.shape[1] :], reference)


class ScaledByAnAttribute:
    """Mixed in before a decoder layer's class: its output scaled by a private attribute."""

    def forward(self, hidden_states, **kwargs) -> torch.Tensor:
        return super().forward(hidden_states, **kwargs) * self._scale


class SignedByItsIndex:
    """Mixed in before a decoder layer's class: its output's sign flipped on odd layers."""

    def forward(self, hidden_states, **kwargs) -> torch.Tensor:
        return super().forward(hidden_states, **kwargs) * (1 - 2 * (self.self_attn.layer_idx % 2))


@pytest.mark.parametrize("mixin", [ScaledByAnAttribute, SignedByItsIndex])
def test_a_layer_whose_forward_reads_what_differs_between_layers_is_traced_on_its_own(checkpoints, mixin):
    """Layers whose forward reads a private attribute or the layer index for its math (not only
    for the cache's update) must not run layer 0's trace: the tokens of the same layers run eagerly."""
    path = checkpoints("llama_sym_g128")
    ids = INPUT_IDS[:1]
    models = []
    for keep in (True, False):
        model = load(path, keep=keep)
        layer_class = type(f"{mixin.__name__}Layer", (mixin, type(model.model.layers[0])), {})
        for index, layer in enumerate(model.model.layers):
            layer.__class__ = layer_class  # one class: the layers trace alike but for what the mixin reads
            layer._scale = 1.0 - 2 * index
        models.append(model)
    reference, model = models
    reference_tokens = greedy(reference, ids, NEW_TOKENS)
    zen_woq_pass.optimize(model, compile=True)
    first, second = model.model.layers
    if mixin is ScaledByAnAttribute:  # the attribute is in the structure: the layers differ
        assert layer_regions.why_not_shared(first) is None
        assert layer_regions.structure(first) != layer_regions.structure(second)
    else:  # the index is not: its use is read in the code, and the layers keep their own forward
        assert "SignedByItsIndex.forward" in layer_regions.why_not_shared(first)
        assert not isinstance(first, layer_regions.RegionForward)
    torch._dynamo.reset()
    out, stamped = _generate_counting_stamp_outs(model, ids)
    assert stamped == 0
    comparison = compare_greedy(reference, model, ids, out.sequences[:, ids.shape[1] :], reference_tokens)
    print(comparison.explain())
    assert comparison.acceptable, comparison.explain()


def head_call(head: torch.nn.Module) -> str:
    """The call a dense head makes for one row, read from the path its module took
    (:mod:`zen_woq_pass.runtime.gemv`'s rule is per CPU)."""
    if isinstance(head, gemv.PackedBf16Forward):
        return "packed_bf16_linear"
    if isinstance(head, gemv.GemvForward):
        return "zen_woq.mv"
    assert type(head) is torch.nn.Linear, type(head)
    return "function linear"


@pytest.mark.parametrize("compile,kernel", [(True, "avx512-int4"), ("layers", "avx512-int4"), (True, "dense")])  # dense: any CPU
def test_inductor_compiles_the_layer_once_and_the_step_calls_it_from_python(checkpoints, compile, kernel):
    if kernel in KERNEL_CALLS and kernel not in four_bit_kernels_here():
        pytest.skip(f"{kernel} does not run on this CPU")
    path = checkpoints("llama_sym_g128")
    ids = INPUT_IDS[:1]
    reference = greedy(load_reference(path), ids, NEW_TOKENS)
    model = zen_woq_pass.optimize(load(path, keep=False), compile=compile, kernel=kernel)
    torch._dynamo.reset()
    tokens, codes = run_and_get_code(greedy, model, ids, NEW_TOKENS)
    assert_same_greedy(path, model, ids, tokens, reference)
    [step] = zen_woq_pass.recent_reports()[-1:]
    # 4 a layer, as inlined; dense: F.linear, and the head's call, whichever path it took on this CPU
    calls = collections.Counter({KERNEL_CALLS.get(kernel, "function linear"): 8})
    if kernel == "dense":
        calls[head_call(model.lm_head)] += 1
    for call, count in calls.items():
        assert step.count_calls(call) == count, (call, "\n".join(step.graph_calls))
    assert step.count_calls("invoke_subgraph") == 0  # counted inside
    assert len(codes) == 1 and codes[0].count("subgraph_0(args)") == 1, codes[0][:2000]  # the layer's code, once
    assert codes[0].count("subgraph_0_args)") == 2  # called per layer
    assert "CppWrapperCodeCache" not in codes[0]


def test_aten_int4_layers_compile_once_and_inductor_keeps_its_own_lowering(checkpoints):
    """Inductor's lowering of aten's int4 op passes its group size wrongly inside a layer compiled
    apart; there the op is called as is, and the lowering is Inductor's again after."""
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    inductors_own = lowering.lowerings[op]
    path = checkpoints("llama_sym_g128")
    ids = INPUT_IDS[:1]
    reference = greedy(load_reference(path), ids, NEW_TOKENS)
    model = zen_woq_pass.optimize(load(path, keep=False), compile=True, kernel="aten-int4")
    torch._dynamo.reset()
    tokens, codes = run_and_get_code(greedy, model, ids, NEW_TOKENS)
    assert_same_greedy(path, model, ids, tokens, reference)
    assert len(codes) == 1 and codes[0].count("subgraph_0(args)") == 1, codes[0][:2000]
    assert codes[0].count("aten._weight_int4pack_mm_for_cpu.default(") == 4  # in the layer's code, once each
    assert lowering.lowerings[op] is inductors_own


def test_code_compiled_with_the_op_called_as_is_has_cache_keys_of_its_own():
    """Inductor's cache keys do not see a swapped lowering; the marker pass makes them differ."""
    graph = torch.fx.symbolic_trace(lambda x: x + 1)

    def key():
        return compiled_fx_graph_hash(graph, [torch.ones(2)], {}, [])[0]

    plain = key()
    with int4pack.called_as_is_by_inductor():
        marked = key()
    assert marked != plain and key() == plain
    assert inductor_config.post_grad_custom_pre_pass is None


class UsersOwnPass(CustomGraphPass):
    """A user's post-grad pre pass: counts the graphs it sees."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs += 1

    def uuid(self) -> str:
        return "a user's own pass, v1"


def test_a_users_own_pre_pass_still_runs_and_the_op_called_as_is_still_keys_the_cache():
    """With a user's ``post_grad_custom_pre_pass`` set, both run, the marker still makes the cache
    keys differ, and the user's setting is as it was after."""
    graph = torch.fx.symbolic_trace(lambda x: x + 1)
    users = UsersOwnPass()

    def key():
        return compiled_fx_graph_hash(graph, [torch.ones(2)], {}, [])[0]

    with inductor_config.patch(post_grad_custom_pre_pass=users, force_disable_caches=True):  # a cache hit runs no pass
        plain = key()
        with int4pack.called_as_is_by_inductor():
            marked = key()
            assert users in get_custom_graph_passes(inductor_config.post_grad_custom_pre_pass)
            torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.randn(8))
        assert users.graphs == 1  # the user's pass ran on the graph compiled inside
        assert key() == plain and inductor_config.post_grad_custom_pre_pass is users
    assert marked != plain


def test_two_threads_swap_the_lowering_one_at_a_time_and_inductors_own_is_back_after_both():
    """Inductor's lowering table is global: a second thread waits for the first to put Inductor's
    lowering back, rather than save the swapped one and restore that after."""
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    inductors_own = lowering.lowerings[op]
    first_inside, first_done, second_inside = threading.Event(), threading.Event(), threading.Event()
    release_first = threading.Event()

    def first():
        with int4pack.called_as_is_by_inductor():
            first_inside.set()
            release_first.wait(10)
        first_done.set()

    def second():
        first_inside.wait(10)
        with int4pack.called_as_is_by_inductor():
            second_inside.set()
            first_done.wait(10)  # leave after the first: the order that broke Inductor's lowering

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    second_waited = not second_inside.wait(0.5)
    release_first.set()
    for thread in threads:
        thread.join(30)
    assert second_waited and second_inside.is_set()
    assert lowering.lowerings[op] is inductors_own


def test_compile_takes_true_false_or_layers():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="compile='fast'"):
        zen_woq_pass.optimize(model, compile="fast")
    with pytest.raises(ValueError, match="cpp_wrapper"):
        zen_woq_pass.optimize(model, compile="layers", cpp_wrapper=True)
