"""The CPU kernels: C++ source (cpu_kernels.cc), its build and XLA registration (native.py), the calls (matmul.py)."""
