"""Build, load and register the C++ packed-matmul kernels (kernels/cpu_kernels.cc) with XLA.

The kernels are compiled from source with the machine's C++ compiler the first time they are
needed, against the XLA FFI headers that ship inside jaxlib, and kept in a cache folder keyed by
a hash of the source, the compiler and the jaxlib version: a second process loads the built
library in milliseconds. They need x86-64 Linux with AVX-512F and a CPU backend; anywhere else
(no compiler, a GPU, another CPU) `kernels_available()` is False and the model uses XLA's dot.
`load_weights` asks once and records the answer in the weights (GPT2Weights.use_kernels).

Set JAX_GPT2_NATIVE=0 to turn the kernels off, JAX_GPT2_KERNEL_THREADS to size their thread pool,
JAX_GPT2_CACHE_DIR to move the build cache.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax

SOURCE = Path(__file__).parent / "cpu_kernels.cc"
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-w"]
# The FFI handlers in the library and the XLA custom-call targets they are registered as.
TARGETS = {
    "float32": ("JaxGpt2PackedMatmulF32", "jax_gpt2_packed_matmul_f32"),
    "bfloat16": ("JaxGpt2PackedMatmulBF16", "jax_gpt2_packed_matmul_bf16"),
    "int8": ("JaxGpt2PackedMatmulI8", "jax_gpt2_packed_matmul_i8"),
    "attention": ("JaxGpt2DecodeAttention", "jax_gpt2_decode_attention"),
}


def cache_dir() -> Path:
    if os.environ.get("JAX_GPT2_CACHE_DIR"):
        return Path(os.environ["JAX_GPT2_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jax-gpt2"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str) -> Path:
    """Where the build for this source, compiler and jaxlib lives."""
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([compiler, *FLAGS, jaxlib.__version__, sys.platform]).encode())
    return cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build_library(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: concurrent builders never see half a library."""
    assert SOURCE.is_file(), f"missing kernel source {SOURCE}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        partial_path = Path(partial.name)
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial_path)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial_path, target)
    finally:
        partial_path.unlink(missing_ok=True)
    assert target.is_file()


def _platform_can_run() -> bool:
    if os.environ.get("JAX_GPT2_NATIVE", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return jax.default_backend() == "cpu"


@functools.cache  # the library and XLA's target registry are per process; build and register once
def kernels_available() -> bool:
    """True when the kernels' targets are registered with XLA and this CPU can run them."""
    compiler = _compiler()
    if not _platform_can_run() or compiler is None:
        return False
    target = library_path(compiler)
    try:
        if not target.is_file():
            build_library(compiler, target)
        library = ctypes.cdll.LoadLibrary(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"jax-gpt2: CPU kernels unavailable, using XLA's dot ({detail.strip()[:500]})", stacklevel=2)
        return False
    if not library.jax_gpt2_kernels_supported():
        return False
    for symbol, name in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def is_registered(name: str) -> bool:
    """Whether the kernel TARGETS names is registered with XLA in this process (built, loaded, runs here)."""
    return name in TARGETS and kernels_available()


def kernels_isa() -> str:
    """The vector instruction set the kernels run on: the library's own answer where it gives one
    (jax_gpt2_kernel_isa), else what this CPU offers (cpu_vector_isa)."""
    if kernels_available():
        library = ctypes.cdll.LoadLibrary(str(library_path(_compiler())))  # already loaded: the same handle
        for symbol in ("jax_gpt2_kernel_isa", "jax_gpt2_kernels_isa"):
            if hasattr(library, symbol):
                getattr(library, symbol).restype = ctypes.c_char_p
                return getattr(library, symbol)().decode()
    return cpu_vector_isa()


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
    if "asimd" in flags or platform.machine() in ("arm64", "aarch64"):
        return "neon"
    return platform.machine() or "unknown"


def kernel_threads() -> int:
    """The kernels' pool size, by the library's rule: JAX_GPT2_KERNEL_THREADS, else every core, at most 64."""
    text = os.environ.get("JAX_GPT2_KERNEL_THREADS")
    threads = int(text) if text else (os.cpu_count() or 1)
    return max(1, min(threads, 64))


def target_name(dtype_name: str) -> str:
    assert dtype_name in TARGETS, f"no kernel named {dtype_name}"
    assert kernels_available(), "register the kernels before naming their targets"
    return TARGETS[dtype_name][1]


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h; MADV_COLLAPSE needs Linux 6.1


def advise_huge_pages(array: jax.Array) -> bool:
    """Ask Linux to back a weight buffer with 2 MiB pages, now (MADV_COLLAPSE), not someday.

    Streaming weights through 4 KiB pages costs a TLB miss every 4 KiB: measured here with a
    plain C++ stream over 470 MB on 2 cores, 28 GB/s on 4 KiB pages against 32-35 GB/s once
    collapsed into huge pages. A hint only: on another OS, a kernel without MADV_COLLAPSE, or THP
    switched off, the call fails quietly and nothing changes. Returns whether the collapse took.
    """
    assert isinstance(array, jax.Array)
    if platform.system() != "Linux" or array.nbytes < 2 * HUGE_PAGE or jax.default_backend() != "cpu":
        return False
    start = array.unsafe_buffer_pointer()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + array.nbytes) // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(first, last - first, _MADV_HUGEPAGE)
    return libc.madvise(first, last - first, _MADV_COLLAPSE) == 0
