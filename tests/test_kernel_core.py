"""The kernels' compute core alone (kernels/core.cc, no XLA, no Python) passes its own C++ test
(kernels/core_test.cc: float64 references, odd shapes, every weight dtype, both cache dtypes, the
decode-attention edge rows, pool-independent results) on every target we can build and execute
here: the host's own CPU, the AVX2 and SSE2 builds on x86-64, Clang as well as GCC, and aarch64
(NEON) cross-compiled with Debian's g++-aarch64-linux-gnu and run under qemu-user, which
.ci/run installs, so the ARM build is checked on every CI run without an ARM machine.
"""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from jax_gpt2.kernels import native
from test_kernels import cpu_flags, expected_native_isa

KERNELS_DIR = native.KERNELS_DIR
CORE_SOURCES = [str(KERNELS_DIR / "core.cc"), str(KERNELS_DIR / "core_test.cc")]
X86 = platform.machine() in ("x86_64", "AMD64")
ARM_CROSS_COMPILER = "aarch64-linux-gnu-g++"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"


def build_core_test(compiler: str, march_flags: list[str], out: Path) -> Path:
    command = [compiler, *native.CORE_FLAGS, "-Wall", "-Werror", *march_flags, *CORE_SOURCES, "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return out


def run_core_test(command: list[str], isa: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"core test failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    checks = int(summary.split(" of ")[1].split()[0])
    assert summary == f"core_test {isa}: {checks} of {checks} checks passed", summary
    assert checks > 1000, "the core test must run its whole suite"


def host_compiler() -> str:
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (CXX or g++) on this machine")
    return compiler


def test_core_passes_its_test_built_for_this_cpu(tmp_path):
    binary = build_core_test(host_compiler(), native.march_flags("native"), tmp_path / "core_test")
    run_core_test([str(binary)], expected_native_isa())


@pytest.mark.parametrize(("march", "isa", "needs"), [("x86-64-v3", "avx2", {"avx2", "fma"}), ("x86-64", "generic", set())])
def test_core_passes_its_test_built_for_an_older_x86_cpu(march, isa, needs, tmp_path):
    if not X86:
        pytest.skip("an x86-64 build cannot execute on this CPU")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())} for the {march} build")
    binary = build_core_test(host_compiler(), native.march_flags(march), tmp_path / "core_test")
    run_core_test([str(binary)], isa)


def test_core_passes_its_test_built_without_amx_on_an_amx_host(tmp_path):
    """Where the CPU has AMX the native build runs the bf16 dot option on its tiles: built without
    them, the same checks cover the vector path that CPUs without AMX (Zen 4) run."""
    if not X86 or "amx_tile" not in cpu_flags():
        pytest.skip("this CPU has no AMX: the native build above already runs the vector path")
    flags = [*native.march_flags("native"), "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
    binary = build_core_test(host_compiler(), flags, tmp_path / "core_test")
    run_core_test([str(binary)], expected_native_isa())


def test_core_passes_its_test_built_by_clang(tmp_path):
    """macOS builds with Clang: its reading of the vector extensions must agree with GCC's."""
    clang = shutil.which("clang++")
    if clang is None:
        pytest.skip("clang++ is not installed")
    binary = build_core_test(clang, native.march_flags("native"), tmp_path / "core_test")
    run_core_test([str(binary)], expected_native_isa())


def test_core_passes_its_test_built_for_aarch64_under_qemu(tmp_path):
    """The NEON build, cross-compiled (armv8-a: NEON is part of the base architecture) and emulated."""
    compiler, qemu = shutil.which(ARM_CROSS_COMPILER), shutil.which("qemu-aarch64")
    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("on an ARM host the native build above is the NEON build")
    if compiler is None or qemu is None or not Path(ARM_SYSROOT).is_dir():
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user)")
    binary = build_core_test(compiler, ["-march=armv8-a"], tmp_path / "core_test")
    run_core_test([qemu, "-L", ARM_SYSROOT, str(binary)], "neon")
