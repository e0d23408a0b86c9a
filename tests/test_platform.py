"""The platform gate decides from CPU flags and from what zentorch registers."""

import pytest
import torch

from zen_woq_pass.planning import platform

from conftest import ZEN3_CPU, ZEN4_CPU

pytestmark = pytest.mark.library_independent


def test_zen3_is_refused_with_the_missing_flags():
    reason = platform.zentorch_cpu_reason(ZEN3_CPU)
    assert "Zen 3" in reason and "avx512_bf16" in reason and "avx512f" in reason


def test_zen4_with_avx512_bf16_passes():
    assert platform.zentorch_cpu_reason(ZEN4_CPU) is None


def test_zen4_with_avx512_hidden_by_a_hypervisor_is_refused():
    hidden = platform.CpuInfo("AuthenticAMD", "AMD EPYC 9654", 0x19, 0x11, frozenset({"avx2"}))
    assert "avx512_bf16" in platform.zentorch_cpu_reason(hidden)


def test_intel_is_refused_even_with_avx512_bf16():
    intel = platform.CpuInfo("GenuineIntel", "Xeon", 6, 143, ZEN4_CPU.flags)
    assert "not an AMD Zen CPU" in platform.zentorch_cpu_reason(intel)


def test_cpuinfo_is_parsed(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC 7763\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n"
    )
    cpu = platform.cpu_info.__wrapped__(str(path))
    assert (cpu.vendor, cpu.family, cpu.model, cpu.model_name) == ("AuthenticAMD", 25, 1, "AMD EPYC 7763")
    assert cpu.flags == {"fpu", "avx2", "fma"} and cpu.zen_generation == "Zen 3"


def test_zentorch_ops_are_usable_in_this_environment():
    # The project's pins install a zentorch built for this torch minor version.
    assert platform.zentorch_unusable_reason() is None
    assert hasattr(torch.ops.zentorch, "zentorch_woq_linear")
