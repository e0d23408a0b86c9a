"""The Inductor FX graph cache, on and shared across fresh processes, never hands back a graph
compiled for other weights or other options. Our pass runs before Inductor: the graph Inductor
keys on is the rewritten one, and the packed weights reach it as inputs, not baked-in values."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.library_independent  # hand-built layers: transformers is imported, never read

SCRIPT = textwrap.dedent(
    """
    import sys, torch, zen_woq_pass
    from zen_woq_pass.models.probe import packed_linear
    from zen_woq_pass.planning.numerics import worst_excess
    seed, kernel = int(sys.argv[1]), sys.argv[2]
    linear = packed_linear(128, 256, 64, zero_point=True, bias=True, seed=seed)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact, bias = linear.dequantized_weight(torch.float32), linear.bias  # before: compiling converts the layer
    with torch.no_grad():
        y = torch.compile(torch.nn.Sequential(linear), backend="zen_woq", options={"kernel": kernel})(x)
    from torch._dynamo.utils import counters
    print("KERNEL", zen_woq_pass.last_report().layers[0].kernel)
    print("EXCESS", worst_excess(y, x, exact, bias))
    print("CACHE", dict(counters["inductor"]).get("fxgraph_cache_hit", 0))
    """
)


def _run(cache_dir, seed, kernel):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(seed), kernel], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ")[0] in ("KERNEL", "EXCESS", "CACHE"))


def test_cache_hits_are_never_stale_across_processes(tmp_path):
    first = _run(tmp_path, seed=1, kernel="zentorch")
    other_weights = _run(tmp_path, seed=2, kernel="zentorch")  # same graph, other weights: a hit, still right
    other_kernel = _run(tmp_path, seed=2, kernel="aten-int4")  # other options: another graph
    assert (first["KERNEL"], other_weights["KERNEL"], other_kernel["KERNEL"]) == ("zentorch", "zentorch", "aten-int4")
    for result in (first, other_weights, other_kernel):
        assert float(result["EXCESS"]) <= 1.0
    assert int(other_weights["CACHE"]) >= 1, "the second process should reuse the cached graph"
