"""Shared test set-up: the ZenDNN algorithm, real checkpoints, and a simulated Zen 3 CPU.

ZENDNNL_MATMUL_ALGO is read once per process at the first zentorch call, so it is set here,
before anything imports zentorch, and only where the CPU needs it: where the platform gate says no
(Zen 3 without AVX512-BF16: garbage on every call; an Intel Xeon with it: garbage on about 10 % of
calls) ZenDNN's default algorithm is wrong for WOQ, and the reference algorithm (9) makes the real
op checkable there. Where the gate says yes (Zen 4), the tests run ZenDNN's default algorithm: the
path users and the benchmarks run.

Tolerances used across the suite:
- one layer: ``zen_woq_pass.planning.numerics.error_bound`` (2**-7 of |x| @ |W|.T + |b|, from bf16 rounding);
- a whole model: SQNR against the fp32 dequantized reference at least ``MODEL_SQNR_DB`` and no more
  than ``MODEL_SQNR_SLACK_DB`` below what the eager bf16 compressed-tensors model itself reaches;
- a converted layer of a real checkpoint on a prompt's rows, either prefill path: SQNR at least
  ``LAYER_SQNR_DB`` against the fp32 reference (bf16 activations and outputs).
"""

import os
from pathlib import Path

from zen_woq_pass.planning import platform  # does not import zentorch

if platform.zentorch_cpu_reason() is not None:
    os.environ.setdefault("ZENDNNL_MATMUL_ALGO", platform.ZENDNN_REFERENCE_ALGO)

import pytest  # noqa: E402
import torch  # noqa: E402

from zen_woq_pass.models.testing import Recipe, make_checkpoint  # noqa: E402

MODEL_SQNR_DB = 35.0
MODEL_SQNR_SLACK_DB = 3.0
LAYER_SQNR_DB = 35.0


def group_args(size: int, symmetric: bool = True, **extra) -> dict:
    """4-bit group-quantized weight args for a custom llmcompressor scheme."""
    return {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": size, **extra}


RECIPES = {
    "llama_sym_g128": Recipe(),
    "qwen2_asym_bias": Recipe(arch="qwen2", scheme="W4A16_ASYM", seed=1),
    "llama_channel": Recipe(scheme={"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}, seed=2),
    "llama_w8a16": Recipe(scheme="W8A16", seed=3),
    "llama_partial": Recipe(ignore=("lm_head", "re:.*mlp.down_proj", "re:.*layers.1.self_attn.*"), seed=4),
    # other producers of W4A16 (issue 11): AWQ (smoothing, then RTN with zero points), GPTQ with actorder
    "llama_awq": Recipe(algorithm="awq", scheme="W4A16_ASYM", seed=8),
    "llama_actorder": Recipe(scheme=group_args(128, actorder="weight"), seed=7),
    # shapes the kernels refuse: out_features 584 and 600 (not multiples of 16), 73 groups of 8, odd group 3
    "llama_n584_g8": Recipe(intermediate_size=584, algorithm="rtn", scheme=group_args(8), seed=5),
    "llama_odd_group": Recipe(hidden_size=384, intermediate_size=600, algorithm="rtn", scheme=group_args(3, symmetric=False), seed=6),
}

ZEN3_CPU = platform.CpuInfo(
    vendor="AuthenticAMD",
    model_name="AMD EPYC 7763 (simulated)",
    family=0x19,
    model=0x01,
    flags=frozenset("fpu sse sse2 avx avx2 fma bmi2".split()),
)


ZEN4_CPU = platform.CpuInfo(
    vendor="AuthenticAMD",
    model_name="AMD EPYC 9654 (simulated)",
    family=0x19,
    model=0x11,
    flags=frozenset(platform.ZENTORCH_WOQ_FLAGS) | {"avx2"},
)


# Set by tests/test_newest_libraries.py: a folder of checkpoints the pinned library set made, one per
# recipe name, for a run on the newest transformers and compressed-tensors (which llmcompressor pins away).
MADE_CHECKPOINTS = "ZEN_WOQ_TEST_CHECKPOINTS"


# transformers releases measured to refuse asymmetric pack-quantized checkpoints at load ("Reinit due to
# size mismatch" of the packed weight_zero_point, then RuntimeError), with compressed-tensors 0.19 and 0.20.
ZERO_POINTS_UNLOADABLE = {"5.23.0"}
ZERO_POINTS_UNLOADABLE_REASON = "this transformers cannot load asymmetric compressed-tensors checkpoints (weight_zero_point)"


def zero_points_loadable() -> bool:
    import transformers

    return transformers.__version__ not in ZERO_POINTS_UNLOADABLE


def is_asymmetric(recipe: Recipe) -> bool:
    return "ASYM" in recipe.scheme if isinstance(recipe.scheme, str) else not recipe.scheme.get("symmetric", True)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> path of a real llmcompressor checkpoint, made once per session on demand. A test that
    asks for an asymmetric one under a transformers that cannot load it is an expected failure."""
    made = {}
    folder = os.environ.get(MADE_CHECKPOINTS)

    def path(name):
        if folder:
            found = Path(folder) / name
            assert found.is_dir(), f"{MADE_CHECKPOINTS}={folder} has no checkpoint {name!r}"
            return found
        if name not in made:
            made[name] = make_checkpoint(RECIPES[name], tmp_path_factory.mktemp(name))
        return made[name]

    def get(name):
        if is_asymmetric(RECIPES[name]) and not zero_points_loadable():
            pytest.xfail(ZERO_POINTS_UNLOADABLE_REASON)
        return path(name)

    get.path = path
    return get


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def zen4_cpu(monkeypatch):
    """Make the platform gate see a Zen 4 CPU (AVX512-BF16). Where the real CPU's gate says no,
    ZenDNN's reference algorithm is set (above), so zentorch's answers are still right here."""
    monkeypatch.setattr(platform, "cpu_info", lambda path="/proc/cpuinfo": ZEN4_CPU)
    return ZEN4_CPU


@pytest.fixture
def zen3_cpu(monkeypatch):
    """Make the platform gate see a Zen 3 CPU (no AVX-512), whatever this machine is."""
    monkeypatch.setattr(platform, "cpu_info", lambda path="/proc/cpuinfo": ZEN3_CPU)
    return ZEN3_CPU


def zentorch_cpu_ok() -> bool:
    return platform.zentorch_cpu_reason() is None
