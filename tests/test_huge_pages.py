"""The weights a decode step streams on 2 MB pages (``zen_woq_pass.runtime.huge_pages``): the same values
and tensor objects on a mapping the kernel was asked to back with 2 MB pages, gone with its last
tensor; zentorch's weights and views of other tensors left where they are; ``optimize``'s compiled
decode step on moved weights gives the eager reference's tokens."""

import gc

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.models.measure import greedy
from zen_woq_pass.runtime import huge_pages

from helpers import INPUT_IDS, NEW_TOKENS, assert_same_greedy, four_bit_kernels_here, load, load_reference

needs_huge_pages = pytest.mark.skipif(huge_pages.unavailable_reason() is not None, reason=str(huge_pages.unavailable_reason()))


def _mapping_of(tensor: torch.Tensor) -> tuple[str, list[str]] | None:
    """(address range, VmFlags) of the mapping holding ``tensor``'s first byte, from /proc/self/smaps."""
    address, current = tensor.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                current = head if start <= address < end else None
            elif head == "VmFlags:" and current:
                return current, line.split()[1:]
    return None


@needs_huge_pages
def test_moved_tensors_keep_their_objects_and_values_on_an_advised_mapping_that_goes_with_them():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 255, (3072, 1024), dtype=torch.uint8, generator=generator)
    scales = torch.randn(3072, 16, generator=generator).to(torch.bfloat16)
    head = torch.nn.Parameter(torch.randn(1000, 576, generator=generator).to(torch.bfloat16), requires_grad=False)
    before = [t.clone() for t in (weight, scales, head)]
    note = huge_pages.move([weight, scales, head, weight])  # a tensor twice is moved once
    assert note.startswith("pages: the 4.4 MB") and "are on 2 MB pages" in note, note
    assert all(torch.equal(t, b) for t, b in zip((weight, scales, head), before))
    assert isinstance(head, torch.nn.Parameter) and weight.shape == (3072, 1024) and weight.is_contiguous()
    assert weight.data_ptr() % huge_pages.HUGE_PAGE == 0 and scales.data_ptr() % huge_pages.ALIGNMENT == 0
    mapping, flags = _mapping_of(weight)
    assert "hg" in flags, flags  # MADV_HUGEPAGE
    assert _mapping_of(head)[0] == mapping and weight.untyped_storage().data_ptr() != head.untyped_storage().data_ptr()
    del weight, scales
    gc.collect()
    assert _mapping_of(head)[0] == mapping  # held while one tensor lives
    del head
    gc.collect()
    assert all(not line.startswith(mapping) for line in open("/proc/self/maps"))


def test_views_and_less_than_a_page_stay_where_they_are():
    whole = torch.zeros(4 << 20, dtype=torch.uint8)
    view = whole[: 3 << 20]
    small = torch.ones(1000)
    pointers = (view.data_ptr(), small.data_ptr())
    note = huge_pages.move([view, small])
    assert (view.data_ptr(), small.data_ptr()) == pointers
    assert "stay on 4 KB pages" in note and "0.0 MB" in note, note  # the view is not counted: not moved


@needs_huge_pages
@pytest.mark.parametrize("kernel", sorted(four_bit_kernels_here(zentorch=False)))
def test_the_compiled_decode_step_on_moved_weights_gives_the_reference_tokens(checkpoints, kernel, monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)  # the test models are smaller than a page
    path = checkpoints("llama_sym_g128")
    reference = greedy(load_reference(path), INPUT_IDS[:1], NEW_TOKENS)
    model = zen_woq_pass.optimize(load(path, keep=False), kernel=kernel, compile=True)
    assert "are on 2 MB pages" in model.zen_woq_report.pages and model.zen_woq_report.pages in str(model.zen_woq_report)
    down_proj = model.model.layers[0].mlp.down_proj
    assert "hg" in _mapping_of(down_proj.zen_woq_weight)[1]
    assert_same_greedy(path, model, INPUT_IDS[:1], greedy(model, INPUT_IDS[:1], NEW_TOKENS), reference)


@pytest.mark.parametrize("kernel", sorted(four_bit_kernels_here()))
def test_zentorch_weights_are_never_moved(checkpoints, kernel, monkeypatch):
    """ZenDNN keys its reordered copy of a weight by address: a zentorch weight stays put."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), kernel=kernel)
    flags = _mapping_of(model.model.layers[0].mlp.down_proj.zen_woq_weight)[1]
    assert ("hg" in flags) == (kernel != "zentorch" and huge_pages.unavailable_reason() is None)


def test_a_mapping_the_os_refuses_leaves_the_tensors_where_they_are(monkeypatch):
    class Refusing:
        def __init__(self, *args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages, "unavailable_reason", lambda: None)
    monkeypatch.setattr(huge_pages.mmap, "mmap", Refusing)
    weight = torch.ones(3 << 20, dtype=torch.uint8)
    pointer = weight.data_ptr()
    note = huge_pages.move([weight])
    assert weight.data_ptr() == pointer and "stay on 4 KB pages" in note and "Cannot allocate memory" in note, note
