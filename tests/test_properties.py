"""Property tests (hypothesis): any layer shape, group size, zero point, bias and M, through the
real pass (match, predicate, pack, self-check, splice) and Inductor, for every kernel of the chain
that can run here: the compiled layer equals the fp32 reference within the bf16 bound."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zen_woq_pass
from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import numerics

pytestmark = pytest.mark.library_independent  # hand-built layers: transformers is imported, never read

# forced, a kernel skips only the CPU gate (zentorch runs here under ZenDNN's reference algorithm)
RUNNABLE_HERE = [kernel.name for kernel in CHAIN if kernel.platform_reason(forced=True) is None]


@st.composite
def layers(draw):
    group_size = draw(st.sampled_from([32, 64, 128, 256]))
    in_features = group_size * draw(st.integers(1, 4))
    out_features = 16 * draw(st.integers(1, 12))
    return out_features, in_features, group_size, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=layers(), rows=st.integers(1, 64), seed=st.integers(0, 2**16), kernel=st.sampled_from(RUNNABLE_HERE))
def test_compiled_layer_matches_fp32_reference(layer, rows, seed, kernel):
    out_features, in_features, group_size, zero_point, bias = layer
    linear = packed_linear(out_features, in_features, group_size, zero_point=zero_point, bias=bias, seed=seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    exact = linear.dequantized_weight(torch.float32)  # before: compiling converts the layer
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(torch.nn.Sequential(linear), backend="zen_woq", options={"kernel": kernel})(x)
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == kernel, decision.reason
    assert numerics.worst_excess(y, x, exact, linear.bias) <= 1.0
