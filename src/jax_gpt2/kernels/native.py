"""Build, load and register the C++ CPU kernels (core.cc + ffi.cc, beside this file) with XLA.

The kernels are compiled from source with the machine's C++ compiler the first time they are
needed, for this CPU (`-march=native`; `-mcpu=native` on ARM), against the XLA FFI headers that ship
inside jaxlib, and kept in a cache folder keyed by the source, the flags, the jaxlib version and
the CPU features the compiler targets (see `library_path`): a second process loads the built
library in milliseconds, and a cache folder shared by two different CPUs never hands one the
other's build. One source serves AVX-512, AVX2+FMA, NEON and plain x86-64 (`kernel_isa` names
which); they run on x86-64 and aarch64 Linux and macOS with a CPU backend. Anywhere else (no
compiler, a GPU, Windows, another CPU) `kernels_available()` is False and the model uses XLA's dot.
`load_weights` asks once and records the answer in the weights (GPT2Weights.use_kernels).

Set JAX_GPT2_NATIVE=0 to turn the kernels off, JAX_GPT2_KERNEL_THREADS to size their thread pool,
JAX_GPT2_CACHE_DIR to move the build cache.
"""

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax

from jax_gpt2.config import WEIGHT_DTYPES

KERNELS_DIR = Path(__file__).parent
SOURCES = [KERNELS_DIR / "core.cc", KERNELS_DIR / "ffi.cc"]
HEADERS = [KERNELS_DIR / "core.h"]
# -ffp-contract=fast: `acc += w * x` must compile to one fused multiply-add (ISO C++ mode in GCC
# does not contract by default). The same flags build the standalone core test.
CORE_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=fast", "-pthread"]
LIBRARY_FLAGS = [*CORE_FLAGS, "-fPIC", "-shared", "-w"]
# The FFI handlers in the library and the XLA custom-call targets they are registered as.
TARGETS = {
    "float32": ("JaxGpt2PackedMatmulF32", "jax_gpt2_packed_matmul_f32"),
    "bfloat16": ("JaxGpt2PackedMatmulBF16", "jax_gpt2_packed_matmul_bf16"),
    "bfloat16_dot": ("JaxGpt2PackedMatmulBF16Dot", "jax_gpt2_packed_matmul_bf16_dot"),  # the bf16_dot option
    "int8": ("JaxGpt2PackedMatmulI8", "jax_gpt2_packed_matmul_i8"),
    "int8_dot": ("JaxGpt2PackedMatmulI8Dot", "jax_gpt2_packed_matmul_i8_dot"),  # the int8_dot option
    "attention": ("JaxGpt2DecodeAttention", "jax_gpt2_decode_attention"),
    "attention_bf16": ("JaxGpt2DecodeAttentionBF16", "jax_gpt2_decode_attention_bf16"),
    "prefill_attention": ("JaxGpt2PrefillAttention", "jax_gpt2_prefill_attention"),
    "prefill_attention_bf16": ("JaxGpt2PrefillAttentionBF16", "jax_gpt2_prefill_attention_bf16"),
    "logsumexp_rows": ("JaxGpt2LogSumExpRows", "jax_gpt2_logsumexp_rows"),
    "logsumexp_top_rows": ("JaxGpt2LogSumExpTopRows", "jax_gpt2_logsumexp_top_rows"),
    "layer_norm_rows": ("JaxGpt2LayerNormRows", "jax_gpt2_layer_norm_rows"),
    "host_masks": ("JaxGpt2HostMasks", "jax_gpt2_host_masks"),  # structured output's masks (host_masks.py)
}
assert set(WEIGHT_DTYPES.values()) <= set(TARGETS), "a matmul kernel for every weight dtype"
_ARM = ("aarch64", "arm64")
_X86 = ("x86_64", "AMD64")


def cache_dir() -> Path:
    if os.environ.get("JAX_GPT2_CACHE_DIR"):
        return Path(os.environ["JAX_GPT2_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jax-gpt2"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def march_flags(march: str) -> list[str]:
    """Compiler flags that target `march`: "native" is this host's CPU; anything else is a value of
    -march (x86-64-v3 for AVX2+FMA, x86-64 for SSE2 only, armv8-a, ...)."""
    assert march, "name a target, or 'native' for this CPU"
    assert not march.startswith("-"), f"give the -march value, not a flag: {march}"
    if march == "native":
        # GCC and Clang on ARM know the host through -mcpu; older Apple Clang rejects -march=native.
        return ["-mcpu=native"] if platform.machine() in _ARM else ["-march=native"]
    return [f"-march={march}"]


def target_features(compiler: str, march: str) -> str:
    """What the compiler makes of `march` on this machine: its predefined macros (__AVX512F__,
    __ARM_FEATURE_..., the compiler's __VERSION__), one per line.

    Keying the build cache by this, rather than by /proc/cpuinfo flags, keys it by exactly what
    decides the instructions in the library (a feature the compiler does not know cannot be in
    it), works the same on Linux and macOS, and changes with the compiler's version too.
    ~20 ms, once per process.
    """
    command = [compiler, *march_flags(march), "-dM", "-E", "-x", "c++", os.devnull]
    macros = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert macros.strip(), f"{compiler} printed no predefined macros"
    return "\n".join(sorted(macros.splitlines()))


def library_path(compiler: str, march: str = "native") -> Path:
    """Where the build for this source, compiler, flags, target CPU features and jaxlib lives."""
    import jaxlib

    key = hashlib.sha256()
    for source in [*SOURCES, *HEADERS]:
        key.update(source.read_bytes())
    key.update(" ".join([compiler, *LIBRARY_FLAGS, *march_flags(march), jaxlib.__version__, sys.platform]).encode())
    key.update(target_features(compiler, march).encode())
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", march)
    return cache_dir() / "kernels" / f"kernels-{name}-{key.hexdigest()[:16]}{suffix}"


def build_library(compiler: str, target: Path, march: str = "native") -> None:
    """Compile into a temporary file beside `target`, then rename: concurrent builders never see half a library.

    The two sources compile at once, in two compiler processes (the XLA headers make ffi.cc as slow
    as the core), then link.
    """
    assert all(source.is_file() for source in SOURCES), f"missing kernel sources in {KERNELS_DIR}"
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = [*LIBRARY_FLAGS, *march_flags(march), f"-I{jax.ffi.include_dir()}"]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
        compiles = [
            subprocess.Popen([compiler, *flags, "-c", str(source), "-o", str(obj)], stderr=subprocess.PIPE, text=True)
            for source, obj in zip(SOURCES, objects, strict=True)
        ]
        for command, process in zip(SOURCES, compiles, strict=True):
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise subprocess.CalledProcessError(process.returncode, str(command), stderr=stderr)
        partial_path = Path(scratch) / f"partial{target.suffix}"
        link = [compiler, *flags, *map(str, objects), "-o", str(partial_path)]
        subprocess.run(link, check=True, capture_output=True, text=True)
        os.replace(partial_path, target)
    assert target.is_file()


def _platform_can_run() -> bool:
    if os.environ.get("JAX_GPT2_NATIVE", "1") == "0":
        return False
    if platform.system() not in ("Linux", "Darwin") or platform.machine() not in (*_X86, *_ARM):
        return False
    return jax.default_backend() == "cpu"


@functools.cache  # one load per build and process: a library stays loaded until the process ends
def load_library(march: str = "native") -> ctypes.CDLL | None:
    """The kernel library built for `march` (built first if the cache has none), or None, with a
    warning, where it cannot be built or loaded, or this CPU cannot run it."""
    compiler = _compiler()
    if not _platform_can_run() or compiler is None:
        return None
    try:
        target = library_path(compiler, march)
        if not target.is_file():
            build_library(compiler, target, march)
        library = ctypes.cdll.LoadLibrary(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"jax-gpt2: CPU kernels unavailable, using XLA's dot ({detail.strip()[:500]})", stacklevel=2)
        return None
    if not library.jax_gpt2_kernels_supported():
        warnings.warn(f"jax-gpt2: this CPU cannot run the kernels built for {march}; using XLA's dot", stacklevel=2)
        return None
    library.jax_gpt2_kernel_isa.restype = ctypes.c_char_p
    return library


def target_name(kernel: str, march: str = "native") -> str:
    """The XLA custom-call target of `kernel` (a key of TARGETS) in the build for `march`.

    XLA keeps one handler per name for the whole process (a second, different one under the same
    name stops the CPU backend from starting), so each build registers under its own names: the
    host's under the plain ones, any other `march` with its name appended.
    """
    assert kernel in TARGETS, f"no kernel named {kernel}"
    assert kernels_available(march), f"register the kernels for {march} before naming their targets"
    return _registered_name(kernel, march)


def _registered_name(kernel: str, march: str) -> str:
    base = TARGETS[kernel][1]
    return base if march == "native" else f"{base}_{re.sub(r'[^A-Za-z0-9]', '_', march)}"


@functools.cache  # XLA's target registry is per process: register each build once
def kernels_available(march: str = "native") -> bool:
    """True when the kernels built for `march` (this CPU's by default) are registered with XLA."""
    library = load_library(march)
    if library is None:
        return False
    for kernel, (symbol, _) in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(_registered_name(kernel, march), capsule, platform="cpu")
    from jax_gpt2.kernels import host_masks  # it names this module's targets: imported here, not at the top

    library.jax_gpt2_set_mask_hook(host_masks.HOOK)
    return True


def kernel_isa(march: str = "native") -> str | None:
    """The vector unit the kernels for `march` were compiled for ("avx512", "avx2", "neon",
    "generic"), or None where they are unavailable."""
    library = load_library(march)
    isa = None if library is None else library.jax_gpt2_kernel_isa().decode()
    assert isa in (None, "avx512", "avx2", "neon", "generic"), f"unknown kernel ISA {isa}"
    return isa


def fma_peak_gflops(seconds: float = 0.3, march: str = "native") -> float | None:
    """The arithmetic ceiling of this host as the kernels for `march` see it: GFLOP/s of 12
    independent vector FMA chains (that build's vectors: an x86-64-v3 build's ymm on an AVX-512 host)
    on every thread of the kernels' pool (best of the runs that fit in ~`seconds`), or None where
    the kernels are unavailable. A busy host lowers it; the bench samples it through a run."""
    assert 0 < seconds < 60
    library = load_library(march)
    if library is None:
        return None
    library.jax_gpt2_fma_peak_gflops.restype = ctypes.c_double
    library.jax_gpt2_fma_peak_gflops.argtypes = [ctypes.c_double]
    peak = float(library.jax_gpt2_fma_peak_gflops(seconds))
    assert peak > 0
    return peak


def has_bf16_dot(march: str = "native") -> bool:
    """Whether the kernels for `march` are available and have the bf16 dot path: built with
    AVX512_BF16 (vdpbf16ps), which -march=native gives on a CPU that has it (Zen 4 and later,
    Cooper Lake, Sapphire Rapids). Elsewhere the option would mean nothing, so the loader refuses it."""
    library = load_library(march)
    has = library is not None and bool(library.jax_gpt2_has_bf16_dot())
    assert isinstance(has, bool)
    return has


def has_int8_dot(march: str = "native") -> bool:
    """Whether the kernels for `march` are available and have the int8 dot path: built with
    AVX512_VNNI (vpdpbusd), which -march=native gives on a CPU that has it (Ice Lake and later
    Xeons, Zen 4 and later). Elsewhere the option would mean nothing, so the loader refuses it."""
    library = load_library(march)
    has = library is not None and bool(library.jax_gpt2_has_int8_dot())
    assert isinstance(has, bool)
    return has


def dot_min_rows(march: str = "native") -> int:
    """From how many rows of x (batch x tokens) the bf16 and int8 dot options take their dot paths
    (fewer rows: the exact paths, as at batch-1 decode)."""
    library = load_library(march)
    assert library is not None, "the kernels are unavailable here"
    library.jax_gpt2_dot_min_rows.restype = ctypes.c_int64
    rows = int(library.jax_gpt2_dot_min_rows())
    assert rows >= 1
    return rows


def is_registered(kernel: str) -> bool:
    """Whether `kernel` (a key of TARGETS) is registered with XLA in this process for this CPU."""
    return kernel in TARGETS and kernels_available()


def kernels_isa() -> str:
    """The vector unit the model's kernels run on: the host build's own answer where the kernels
    are available, else what this CPU offers (cpu_vector_isa), for reports of the XLA path."""
    isa = kernel_isa("native")
    return cpu_vector_isa() if isa is None else isa


def cpu_vector_isa(cpuinfo: str | None = None) -> str:
    """The widest vector unit this CPU reports: avx512, avx2 (with FMA), neon, or the machine name."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    if "asimd" in flags or platform.machine() in _ARM:
        return "neon"
    return platform.machine() or "unknown"


def kernel_threads() -> int:
    """The kernels' pool size, by the library's rule: JAX_GPT2_KERNEL_THREADS, else every core, at most 64."""
    text = os.environ.get("JAX_GPT2_KERNEL_THREADS")
    threads = int(text) if text else (os.cpu_count() or 1)
    return max(1, min(threads, 64))
