"""Perplexity of a token sequence by sliding windows: exact, batched, compiled once per file.

The definition (transformers' "perplexity of fixed-length models" recipe, with its count fixed):
windows of at most max_length tokens begin every `stride` tokens, until one reaches the end of the
text. Each token is scored once, by the first window that holds it as a new target (past the end
of the window before), with all the context that window gives it. A window's first token has no
context inside it, so the text's first token is never scored, and with stride == max_length
neither is the first token of each later window (as in transformers' recipe).

    perplexity = exp(sum of negative log-likelihoods / number of scored tokens)

How it runs: windows are packed B at a time into one (B, T) block, the short last window padded
on the right (causal attention never lets a real token see a later pad) and a short last batch
padded with empty rows, so every batch has the same shape and the file compiles once. Only the
hidden states of scored positions go through lm_head: R of them per batch, a bound fixed by
(B, T, stride), in chunks of X, so no (B, T, V) logits block exists. Log-softmax is float32 even
for bf16 weights (its normalizer by the kernels' logsumexp_rows where the weights use the
kernels); the device returns one float32 NLL per scored slot and the host sums them in float64.

Shape key: model.py's (B windows in a batch, T window length, D, V, R scored slots of one batch,
X slots per lm_head chunk; R // X chunks).
"""

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jax_gpt2.config import GPT2Config
from jax_gpt2.kernels import logsumexp_rows
from jax_gpt2.kvcache import check_kv_dtype
from jax_gpt2.sharding import data_shards, fetch, padded_rows, put, put_rows
from jax_gpt2.model import check_token_ids, lm_logits, shared_cache, transformer
from jax_gpt2.weights import GPT2Weights

# Scored positions per lm_head chunk: a (512, V) float32 logits block, ~100 MB for GPT-2's vocabulary.
MAX_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the text; it scores tokens [first_target, end), each given all before it from begin."""

    begin: int
    end: int
    first_target: int

    @property
    def num_scored(self) -> int:
        return self.end - self.first_target


@dataclasses.dataclass(frozen=True)
class BatchNLL:
    """One batch's share: windows evaluated, their summed negative log-likelihood (float64), tokens scored."""

    num_windows: int
    nll_sum: float
    num_scored: int


def check_arguments(num_tokens: int, config: GPT2Config, max_length: int, stride: int, batch_size: int) -> None:
    """Host-side checks of the window settings, each a ValueError that says what to change."""
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (the first is never scored); got {num_tokens}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a window scores tokens after its first); got {max_length}")
    if max_length > config.n_positions:
        raise ValueError(f"max_length={max_length} is longer than the model's n_positions={config.n_positions}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1; got {stride}")
    if stride > max_length:
        raise ValueError(f"stride={stride} > max_length={max_length} would skip the tokens between windows")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Every window that scores at least one token, in text order."""
    assert num_tokens >= 2
    assert 2 <= max_length
    assert 1 <= stride <= max_length
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_target = max(prev_end, begin + 1)
        if first_target < end:  # a one-token last window after stride == max_length scores nothing
            windows.append(Window(begin, end, first_target))
        prev_end = end
        if end == num_tokens:
            break
    assert windows[0].first_target == 1
    assert windows[-1].end >= num_tokens - 1  # only a dropped one-token window ends later
    return windows


def scored_slots(batch_size: int, window_length: int, stride: int) -> int:
    """R: room for the scored tokens of any B consecutive windows, rounded up to whole chunks.

    Only the first window scores up to T - 1 tokens; each later one at most min(stride, T - 1),
    since it starts stride after the window before and scores only past that window's end.
    """
    assert batch_size >= 1
    assert window_length >= 2
    bound = (window_length - 1) + (batch_size - 1) * min(stride, window_length - 1)
    chunk = min(MAX_CHUNK, bound)
    slots = -(-bound // chunk) * chunk
    assert slots >= bound
    assert slots % chunk_size(slots) == 0
    return slots


def chunk_size(num_slots: int) -> int:
    """X for R slots: MAX_CHUNK, or all R when fewer (scored_slots makes R a multiple of it)."""
    assert num_slots >= 1
    chunk = min(MAX_CHUNK, num_slots)
    assert chunk >= 1
    return chunk


def pack_batch(
    ids: np.ndarray, windows: Sequence[Window], batch_size: int, window_length: int, num_slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids_BT, positions_R, targets_R, n): the windows right-padded into rows, and their n scored tokens.

    positions_R[i] is the flat index b * T + t of the hidden state that predicts targets_R[i];
    slots from n on are padding (index 0, target 0), computed and then ignored.
    """
    B, T, R = batch_size, window_length, num_slots
    assert 1 <= len(windows) <= B
    assert all(window.end - window.begin <= T for window in windows)
    ids_BT = np.zeros((B, T), np.int32)
    positions_R = np.zeros(R, np.int32)
    targets_R = np.zeros(R, np.int32)
    n = 0
    for b, window in enumerate(windows):
        ids_BT[b, : window.end - window.begin] = ids[window.begin : window.end]
        # The token at text index i is predicted by the hidden state at window position i - begin - 1.
        predictors = np.arange(window.first_target, window.end) - window.begin - 1
        positions_R[n : n + window.num_scored] = b * T + predictors
        targets_R[n : n + window.num_scored] = ids[window.first_target : window.end]
        n += window.num_scored
    assert n <= R
    return ids_BT, positions_R, targets_R, n


@functools.partial(jax.jit, static_argnames=("config", "kv_dtype"))
def scored_nll(
    ids_BT: jax.Array, positions_R: jax.Array, targets_R: jax.Array, weights: GPT2Weights, config: GPT2Config,
    kv_dtype=jnp.float32,
) -> jax.Array:  # fmt: skip
    """nll_R (float32): -log p(targets_R[i]) from the hidden state at flat position positions_R[i]."""
    B, T = ids_BT.shape
    R = positions_R.shape[0]
    X = chunk_size(R)
    assert targets_R.shape == (R,)
    assert R % X == 0
    assert T <= config.n_positions
    cache = shared_cache(config, jnp.zeros((B,), jnp.int32), T, kv_dtype)  # no cache kept: one layer, shared
    hidden_BTD, _ = transformer(ids_BT, cache, weights, config)
    hidden_RD = hidden_BTD.reshape(B * T, config.n_embd)[positions_R]

    def chunk_nll(chunk):
        hidden_XD, targets_X = chunk
        logits_XV = lm_logits(hidden_XD[None], weights)[0]
        assert logits_XV.dtype == jnp.float32  # log-softmax in float32, whatever the weights' dtype
        target_logit_X = jnp.take_along_axis(logits_XV, targets_X[:, None], axis=1)[:, 0]
        return logsumexp_rows(logits_XV, weights.use_kernels) - target_logit_X

    chunks = (hidden_RD.reshape(R // X, X, config.n_embd), targets_R.reshape(R // X, X))
    nll_R = jax.lax.map(chunk_nll, chunks).reshape(R)
    assert nll_R.dtype == jnp.float32
    return nll_R


def batch_nlls(
    token_ids: Sequence[int] | np.ndarray,
    weights: GPT2Weights,
    config: GPT2Config,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 8,
    kv_dtype=jnp.float32,
) -> Iterator[BatchNLL]:
    """The summed NLL of each batch of windows, in text order: for a progress bar or a running figure."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one 1-D sequence; got shape {ids.shape}")
    check_arguments(ids.shape[0], config, max_length, stride, batch_size)
    kv_dtype = check_kv_dtype(kv_dtype)
    ids = check_token_ids(ids[None, :], config)[0]
    windows = plan_windows(ids.shape[0], max_length, stride)
    # One shape for the whole file: no wider than the text, no more rows than windows (on a mesh,
    # rounded up to whole "data" shards: the extra rows are empty windows that score nothing).
    B, T = padded_rows(min(batch_size, len(windows)), weights.mesh), min(max_length, ids.shape[0])
    R = scored_slots(B, T, stride)
    for first in range(0, len(windows), B):
        group = windows[first : first + B]
        ids_BT, positions_R, targets_R, n = pack_batch(ids, group, B, T, R)
        if weights.mesh is not None:
            ids_BT, positions_R, targets_R = place_batch(ids_BT, positions_R, targets_R, weights.mesh)
        nll_R = fetch(scored_nll(ids_BT, positions_R, targets_R, weights, config, kv_dtype))
        yield BatchNLL(len(group), float(np.sum(nll_R[:n], dtype=np.float64)), n)


def place_batch(ids_BT: np.ndarray, positions_R: np.ndarray, targets_R: np.ndarray, mesh: Mesh) -> tuple[jax.Array, ...]:
    """One batch placed on the mesh: windows split over "data" (across processes too), the scored slots whole."""
    assert ids_BT.shape[0] % data_shards(mesh) == 0
    assert positions_R.shape == targets_R.shape
    return put_rows(ids_BT, mesh), put(positions_R, mesh, P()), put(targets_R, mesh, P())


def perplexity_of(batches: Iterable[BatchNLL]) -> tuple[float, int]:
    """(perplexity, tokens scored) from every batch of a text, summed in float64."""
    nll_sum, num_scored = 0.0, 0
    for batch in batches:
        nll_sum += batch.nll_sum
        num_scored += batch.num_scored
    assert num_scored >= 1
    assert math.isfinite(nll_sum)
    return float(np.exp(nll_sum / num_scored)), num_scored


def perplexity(
    token_ids: Sequence[int] | np.ndarray,
    weights: GPT2Weights,
    config: GPT2Config,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 8,
    kv_dtype=jnp.float32,
) -> float:
    """Sliding-window perplexity of one token sequence (see the module docstring for the exact definition).

    kv_dtype jnp.bfloat16 rounds each window's keys and values to bfloat16 before attention reads them.
    """
    batches = batch_nlls(token_ids, weights, config, max_length, stride, batch_size, kv_dtype)
    ppl, num_scored = perplexity_of(batches)
    assert num_scored >= 1
    assert ppl > 0
    return ppl
