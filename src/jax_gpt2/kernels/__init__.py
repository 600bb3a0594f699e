"""The CPU kernels, one folder: the C++ source (core.cc, the compute; ffi.cc, the XLA glue), its build
and registration with XLA (native.py), and the calls the model makes: packed matmul (matmul.py),
attention over the cache, one new query per row or many (attention.py), log-softmax's normalizer
and top k (softmax.py), and layer norm (norm.py). Whether they run is decided once at load
(GPT2Weights.use_kernels).
"""

from jax_gpt2.kernels.attention import decode_attention, has_decode_kernel, has_prefill_kernel, prefill_attention
from jax_gpt2.kernels.matmul import packed_matmul, packed_matmul_BT
from jax_gpt2.kernels.softmax import logsumexp_rows, logsumexp_top_rows
from jax_gpt2.kernels.native import kernels_available, kernels_isa, kernel_threads
from jax_gpt2.kernels.norm import layer_norm_rows
from jax_gpt2.pages import advise_huge_pages

__all__ = [
    "advise_huge_pages",
    "decode_attention",
    "has_decode_kernel",
    "has_prefill_kernel",
    "kernel_threads",
    "kernels_available",
    "kernels_isa",
    "layer_norm_rows",
    "logsumexp_rows",
    "logsumexp_top_rows",
    "packed_matmul",
    "packed_matmul_BT",
    "prefill_attention",
]
