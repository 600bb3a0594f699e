"""Structured output's grammar masks inside a jitted decode chunk: between one step's pick and the
next step's logits, the chunk asks the host which tokens each constrained row may pick next.

    decode step i:  logits --pick--> token_W --host_masks(table, token_W, picks_W)--> allowed_WK
                      (the C++ target calls HOOK, a C function pointer into this module; HOOK finds the
                       mask writer registered under `table` and lets it feed each constrained row's
                       grammar its token and write the row's next mask straight into XLA's buffer)
    decode step i + 1: logits masked by allowed_WK --pick--> ...

Why not jax.experimental.io_callback: XLA runs a program with a JAX host callback to its end before
the call returns (the engine could not hand out one chunk while the next runs), each callback cost
~0.4-0.9 ms on the 2-core Xeon (its arguments are put on a device and taken back), and such a
program is never written to the persistent compile cache. Here the kernel library's FFI target makes
a plain C call, which takes the GIL like any ctypes callback: asynchronous and cacheable. And the
call has no side effect in JAX's eyes (a side effect would send every call of the program down JAX's
slow Python dispatch, ~8 ms a chunk): the writer feeds a row's grammar its pick number picks_W[w]
once however often it is asked, so a call is a function of its arguments, and each step's call
depends on that step's pick, which depends on the mask before it: XLA runs them once each, in order.

The writers are process-wide (XLA holds a function pointer, not a Python object): `register` returns
the table number a program passes at run time, and a writer is forgotten when it is garbage.
"""

import ctypes
import itertools
import logging
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.kernels import native

log = logging.getLogger(__name__)

# writer(token_W, picks_W, allowed_WK): feed each constrained row's grammar its pick number picks_W[w]
# (unless it has it) and write the row's next mask into allowed_WK (every bit set on entry: rows it
# leaves alone allow every token).
MaskWriter = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

_WRITERS: "weakref.WeakValueDictionary[int, MaskWriter]" = weakref.WeakValueDictionary()
_TABLES = itertools.count(1)

_HOOK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int64)  # fmt: skip


def register(writer: MaskWriter) -> int:
    """The table number under which host_masks reaches `writer` (held weakly: keep the writer alive)."""
    assert callable(writer)
    table = next(_TABLES)
    assert table < 2**31, "a table number fits the int32 that carries it"
    _WRITERS[table] = writer
    return table


def _hook(table: int, width: int, token_p: int, picks_p: int, allowed_p: int, words: int) -> int:
    """What the C++ target calls (on an XLA thread): 0 when the writer wrote, 1 when it failed (logged)."""
    try:
        token_W = np.ctypeslib.as_array((ctypes.c_int32 * width).from_address(token_p))
        picks_W = np.ctypeslib.as_array((ctypes.c_int32 * width).from_address(picks_p))
        allowed_WK = np.ctypeslib.as_array((ctypes.c_int32 * (width * words)).from_address(allowed_p)).reshape(width, words)
        _WRITERS[table](token_W, picks_W, allowed_WK)
        return 0
    except Exception:  # an exception must not cross into C: the target returns an error instead
        log.exception("the grammar mask writer of table %d failed", table)
        return 1


HOOK = _HOOK_TYPE(_hook)  # module-level: the C function pointer lives as long as the process


def host_masks(table_1: jax.Array, token_W: jax.Array, picks_W: jax.Array, num_words: int) -> jax.Array:
    """allowed_WK (int32, 32 tokens a word) from the mask writer registered under table_1[0], given each
    row's last pick (token_W) and how many tokens it has picked (picks_W: the last is that number)."""
    (W,) = token_W.shape
    assert table_1.shape == (1,)
    assert token_W.dtype == jnp.int32
    assert picks_W.shape == (W,)
    assert picks_W.dtype == jnp.int32
    assert num_words >= 1
    call = jax.ffi.ffi_call(native.target_name("host_masks"), jax.ShapeDtypeStruct((W, num_words), jnp.int32))
    allowed_WK = call(table_1, token_W, picks_W)
    assert allowed_WK.shape == (W, num_words)
    return allowed_WK
