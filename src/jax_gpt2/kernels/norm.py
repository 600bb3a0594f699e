"""Layer norm of rows by the C++ kernel (core.cc, "Layer norm of rows").

XLA on CPU runs a layer norm as five fusions, each a pass over the whole (M, D) block; the kernel
reads each row three times while it sits in L1, over the pool: before each block's attention and
MLP and before the lm_head, 25 times a gpt2 forward (~15 ms of a 512-token prefill in XLA on the
2-core Xeon). The target is in every build of the library (native.target_name asserts it).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.kernels import native


def layer_norm_rows(x_MD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """out_MD = (x - mean) / sqrt(var + eps) * scale_D + bias_D per row, var biased (torch.nn.LayerNorm's),
    all float32. Each row is normalised by one thread in one order: its result never depends on M."""
    M, D = x_MD.shape
    assert x_MD.dtype == jnp.float32, "the kernel normalises float32 rows"
    assert scale_D.shape == (D,)
    assert bias_D.shape == (D,)
    assert eps > 0
    call = jax.ffi.ffi_call(native.target_name("layer_norm_rows"), jax.ShapeDtypeStruct((M, D), jnp.float32),
                            vmap_method="sequential")  # fmt: skip
    out_MD = call(x_MD, scale_D.astype(jnp.float32), bias_D.astype(jnp.float32), eps=np.float32(eps))
    assert out_MD.shape == (M, D)
    return out_MD
