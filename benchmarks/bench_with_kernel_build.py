"""Run `jax-gpt2 ...` with the kernels of one -march build standing in for the host's own build.

Measurement harness only (not part of the library): the library registers the host build under the
plain target names; this points kernels_available()/target_name() at the build for MARCH instead.
Usage: uv run python benchmarks/bench_with_kernel_build.py x86-64-v3 bench --preset gpt2 ...
(the AVX2 build on an AVX-512 host). `benchmarks/serve_load.py --kernel-build MARCH` uses it for both
its server and its `generate` baseline. Once the kernel choice is a static field of the weights
(issue 15, Python half), pass the build there instead and delete this file.
"""
import sys

from jax_gpt2.kernels import native


def use_kernel_build(march: str) -> None:
    """Point this process's kernels at the build for `march` (call before any kernel is traced)."""
    available, name, isa, peak = native.kernels_available, native.target_name, native.kernel_isa, native.fma_peak_gflops
    native.kernels_available = lambda march_=march: available(march_)
    native.target_name = lambda kernel, march_=march: name(kernel, march_)
    native.kernel_isa = lambda _="native": isa(march)  # what bench records as the path that ran
    native.fma_peak_gflops = lambda seconds=0.3: peak(seconds, march)  # this build's ceiling, not the host's
    assert native.kernels_available(), f"the {march} build is unavailable"
    print(f"kernels: {march} build, ISA {native.kernel_isa(march)}", file=sys.stderr)


if __name__ == "__main__":
    use_kernel_build(sys.argv[1])
    from jax_gpt2.cli import main

    sys.argv = ["jax-gpt2", *sys.argv[2:]]
    sys.exit(main())
