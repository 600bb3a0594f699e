"""The serving engine's device side: the slots' state, and the jitted programs the engine runs on it.

    Slots     a KV cache of max_batch rows x S slots (start 0, end the next slot each row writes) and
              each row's decode state and settings (RowState)
    staging   a one-row KVCache of S slots where a prompt is prefilled, chunk by chunk

    prefill_chunk   the next prompt tokens into staging; the last token's logits, prompt logprobs if asked
    copy_prompt     staging's filled slots into a free row            admit   pick new rows' first tokens
    prefill_rows    short prompts, several at once, straight into free rows, and their first tokens
    decode_chunk    up to Y steps of rows [0, W): feed each pending token, pick the next
    speculate_chunk the same with prompt lookup: each step verifies every row's draft after its
                    pending token (speculate.py's pieces), so a step may yield several tokens a row
    move_slots, move_state   a row's filled slots and state to a lower row (so W can shrink)
    release         mark rows done          read_block, restore_block   prefix-cache blocks out of staging or
                                            a row / into staging

Every program has fixed shapes (the static arguments are a bucket, a width or a step count from a
short list fixed at start), so a warmed-up engine never compiles. Each row's state between chunks
is "its last token is picked and not yet fed": a step feeds it and picks the next, so a row that
has finished costs no forward pass. Shape letters are model.py's key (Y the steps of one chunk, A the
top alternatives per token, W the rows one call runs: a decode chunk's rows [0, W) of the cache (see
kvcache.py), or the prompts of one prefill_rows / admit).

Why a decode loop of its own beside generate.py's (`RowState` / `pick` / `decode_chunk` beside
`DecodeState` / `pick_next` / `decode`): both pick through the same sampling chain
(`sampling.pick_logits`, `choose_tokens`) and derive each row's key the same way
(`sampling.row_keys`), so their tokens are equal, but the state they carry differs. A server row
changes owner between chunks, so its settings, token limit, logprob request and grammar mask live in
the row (RowState), and which sampler stages run is decided at run time from the busy rows
(`runtime_flags`), not at trace time from one request; a row's state is "last token picked, not yet
fed", so a finished row costs no forward pass; and a step runs over a prefix of the rows (the
width W). `generate` holds one request whose settings are static, so its loop stays the plain one
a reader learns first.
"""

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jax_gpt2.config import GPT2Config
from jax_gpt2.generate import PAD_ID
from jax_gpt2.kernels.host_masks import host_masks
from jax_gpt2.kvcache import KVCache
from jax_gpt2.model import empty_cache, lm_logits, transformer, transformer_from_empty
from jax_gpt2.sharding import cache_specs, rows_spec
from jax_gpt2.sampling import (
    FILTERED, MAX_TOP_LOGPROBS, SamplingParams, SamplingSettings, apply_allowed_words, choose_tokens, mask_words,
    pick_logits, runtime_flags, sampling_params, token_logprobs,
)  # fmt: skip
from jax_gpt2.speculate import (
    PromptLookup, accept_drafts, accept_keys, choose_width, count_emitted, decayed_evidence, emitted_lengths,
    lookup_draft, prior_evidence, verified_guesses, write_tokens,
)  # fmt: skip
from jax_gpt2.weights import GPT2Weights

if TYPE_CHECKING:
    from jax.sharding import Mesh

TOP_LOGPROBS = MAX_TOP_LOGPROBS  # A: alternatives computed per token
# Prompt tokens per prefix-cache block: a prefix is reused in whole blocks. Small, so a harness's
# multiple-choice prompts (one context, a continuation each) reuse nearly all of their context: in
# benchmarks/harness_bench.py's task 55% of all tokens with blocks of 16, 31% with 64. A block costs
# one small program call to save or restore (gpt2: 1.2 MiB of float32 keys and values).
PREFIX_BLOCK = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowState:
    """What each row decodes with, besides its cache; B is max_batch in Slots, W inside a chunk."""

    seen_BV: jax.Array  # bool: the token occurs in the row so far (for the repetition penalty)
    counts_BV: jax.Array  # int32: how often the token occurs in the row's output (frequency/presence penalties)
    done_B: jax.Array  # bool: the row emits nothing more (its sequence ended, or the row is free)
    keys_B2: jax.Array  # uint32 (B, 2): each row's own random key
    step_B: jax.Array  # int32: tokens the row has picked (its key is folded with it)
    pending_B: jax.Array  # int32: the last picked token, fed through the model at the row's next step
    limit_B: jax.Array  # int32: max_new_tokens; the row is done once it has picked that many
    logprobs_B: jax.Array  # bool: the row reports logprobs
    params: SamplingParams
    # Kept by speculate_chunk only (decode_chunk leaves them stale: an engine runs one or the other).
    history_BS: jax.Array  # int32: the token of each cache slot, the pending one at slot end_B (prompt lookup)
    hits_B: jax.Array  # float32: recent accepted draft tokens (decayed: speculate.decayed_evidence)
    trials_B: jax.Array  # float32: recent verified draft tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """The engine's device state: one cache of max_batch rows (start 0, end the next slot to write) and each row's state."""

    cache: KVCache
    rows: RowState


def empty_slots(config: GPT2Config, max_batch: int, max_seq_len: int, dtype) -> Slots:
    """max_batch free (done) rows over a cache of max_seq_len slots."""
    assert max_batch >= 1
    assert max_seq_len >= 1
    B = max_batch
    hits_B, trials_B = prior_evidence(B)
    rows = RowState(
        seen_BV=jnp.zeros((B, config.vocab_size), jnp.bool_),
        counts_BV=jnp.zeros((B, config.vocab_size), jnp.int32),
        done_B=jnp.ones((B,), jnp.bool_),
        keys_B2=jnp.zeros((B, 2), jnp.uint32),
        step_B=jnp.zeros((B,), jnp.int32),
        pending_B=jnp.zeros((B,), jnp.int32),
        limit_B=jnp.zeros((B,), jnp.int32),
        logprobs_B=jnp.zeros((B,), jnp.bool_),
        params=jax.tree.map(jnp.asarray, sampling_params([SamplingSettings()] * B)),
        history_BS=jnp.zeros((B, max_seq_len), jnp.int32),
        hits_B=hits_B,
        trials_B=trials_B,
    )
    cache = empty_cache(config, jnp.zeros((B,), jnp.int32), max_seq_len, dtype)
    return Slots(cache, rows)


def empty_slots_on(mesh: "Mesh | None", config: GPT2Config, max_batch: int, max_seq_len: int, dtype) -> Slots:
    """`empty_slots`, made where they live: on a mesh, rows (decode slots) split over "data" and the
    cache's heads over "model" (sharding.cache_specs), so XLA never moves a slot between devices."""
    if mesh is None:
        return empty_slots_jit(config, max_batch, max_seq_len, dtype)
    make = functools.partial(empty_slots, config, max_batch, max_seq_len, dtype)
    shapes = jax.eval_shape(make)
    rows = jax.tree.map(lambda x: NamedSharding(mesh, rows_spec(x.ndim, x.shape[0], mesh)), shapes.rows)
    cache = jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(shapes.cache, mesh))
    made = jax.jit(make, out_shardings=Slots(cache, rows))()
    assert made.cache.k_LBNSH.sharding == cache.k_LBNSH
    assert made.rows.done_B.sharding == rows.done_B
    return made


def empty_staging(config: GPT2Config, max_seq_len: int, dtype) -> KVCache:
    return empty_cache(config, jnp.zeros((1,), jnp.int32), max_seq_len, dtype)


def begin_prompt(staging: KVCache) -> KVCache:
    """Staging for a new prompt: nothing in it yet (its slots are overwritten as the prompt comes in)."""
    assert staging.end_B.shape == (1,)
    return dataclasses.replace(staging, end_B=jnp.zeros((1,), jnp.int32))


def _no_logprobs(B: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    zeros_BA = jnp.zeros((B, TOP_LOGPROBS))
    return jnp.zeros((B,)), zeros_BA.astype(jnp.int32), zeros_BA


def pick(
    rows: RowState, logits_BV: jax.Array, use_kernel: bool, banned_B: jax.Array | None = None
) -> tuple[RowState, tuple[jax.Array, ...]]:
    """Each running row picks its next token from its logits; a row is done at one of its end tokens
    (params.end_ids_BU: eos unless ignore_eos, and stop_token_ids) or at its limit. banned_B: a token
    each row may not pick (V or more: none), its rejected lookup draft (see speculate_chunk).
    use_kernel: the logprobs' log-sum-exp and top k by the CPU kernel (the weights' use_kernels).

    Every sampler stage is decided at run time (`runtime_flags`): rows with different settings share
    one compiled step, and a greedy batch still never sorts the vocabulary. Returns the rows and
    (token_B, emitted_B, logprob_B, top_ids_BA, top_logprobs_BA); logprobs only if some row asks.
    """
    B = rows.done_B.shape[0]
    assert logits_BV.shape == rows.seen_BV.shape
    assert rows.params.end_ids_BU.shape[0] == B
    emitted_B = ~rows.done_B
    flags = runtime_flags(rows.params, emitted_B)
    picked_BV = pick_logits(logits_BV, rows.seen_BV, rows.counts_BV, rows.params, flags)
    if banned_B is not None:
        picked_BV = picked_BV.at[jnp.arange(B), banned_B].set(FILTERED, mode="drop")
    step_keys_B = jax.vmap(jax.random.fold_in)(rows.keys_B2, rows.step_B)
    token_B = jnp.where(emitted_B, choose_tokens(picked_BV, rows.params, step_keys_B, flags), PAD_ID)
    step_B = rows.step_B + emitted_B.astype(jnp.int32)
    logprobs = jax.lax.cond(
        jnp.any(rows.logprobs_B & emitted_B), lambda: token_logprobs(picked_BV, token_B, TOP_LOGPROBS, use_kernel),
        lambda: _no_logprobs(B),
    )  # fmt: skip
    new_rows = dataclasses.replace(
        rows,
        seen_BV=rows.seen_BV.at[jnp.arange(B), token_B].max(emitted_B),
        counts_BV=rows.counts_BV.at[jnp.arange(B), token_B].add(emitted_B.astype(jnp.int32)),
        done_B=rows.done_B | jnp.any(token_B[:, None] == rows.params.end_ids_BU, axis=-1) | (step_B >= rows.limit_B),
        step_B=step_B,
        pending_B=jnp.where(emitted_B, token_B, rows.pending_B),
    )
    assert new_rows.done_B.shape == (B,)
    return new_rows, (token_B, emitted_B, *logprobs)


def prefill_chunk(
    staging: KVCache, ids_1T: jax.Array, num_real: jax.Array, next_ids_1T: jax.Array, want_logprobs: jax.Array,
    weights: GPT2Weights, config: GPT2Config,
) -> tuple[KVCache, jax.Array, tuple[jax.Array, ...]]:  # fmt: skip
    """The next num_real prompt tokens (right-padded to the bucket T) into the one-row staging cache.

    Returns the cache (end advanced by num_real), the logits after the last real token, and the
    prompt logprobs of the chunk (position t: log_softmax at t of next_ids_1T[t], and the top A),
    computed only when asked: the logits of every position cost T times one token's lm_head.
    """
    T = ids_1T.shape[1]
    assert ids_1T.shape == (1, T)
    assert next_ids_1T.shape == (1, T)
    hidden_1TD, cache = transformer(ids_1T, staging, weights, config)
    cache = dataclasses.replace(cache, end_B=staging.end_B + num_real)  # the padding is not the prompt's
    last_1D = jax.lax.dynamic_index_in_dim(hidden_1TD[0], num_real - 1, axis=0, keepdims=True)
    last_logits_1V = lm_logits(last_1D[None], weights)[:, 0]

    def prompt_logprobs() -> tuple[jax.Array, ...]:
        return token_logprobs(lm_logits(hidden_1TD, weights)[0], next_ids_1T[0], TOP_LOGPROBS, weights.use_kernels)

    logprobs = jax.lax.cond(want_logprobs, prompt_logprobs, lambda: _no_logprobs(T))
    assert last_logits_1V.shape == (1, config.vocab_size)
    return cache, last_logits_1V, logprobs


def copy_prompt(slots: Slots, staging: KVCache, row: jax.Array, bucket: int) -> Slots:
    """The first `bucket` slots of the staging cache into `row` of the slots' cache (in place)."""
    assert staging.k_LBNSH.shape[1] == 1
    assert bucket <= staging.max_len

    def move(cache_LBNSH: jax.Array, staged_L1NSH: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(cache_LBNSH, staged_L1NSH[:, :, :, :bucket], (0, row, 0, 0, 0))

    cache = dataclasses.replace(
        slots.cache, k_LBNSH=move(slots.cache.k_LBNSH, staging.k_LBNSH), v_LBNSH=move(slots.cache.v_LBNSH, staging.v_LBNSH)
    )
    return Slots(cache, slots.rows)


def admit(
    slots: Slots, last_logits_WV: jax.Array, prompt_ids_WT: jax.Array, num_prompt_W: jax.Array, rows_W: jax.Array,
    keys_W2: jax.Array, params_W: SamplingParams, limit_W: jax.Array, want_logprobs_W: jax.Array, allowed_WK: jax.Array,
    use_kernel: bool,
) -> tuple[Slots, tuple[jax.Array, ...]]:  # fmt: skip
    """Start W prefilled prompts (their slots already filled) in rows_W: pick each one's first token
    from its prompt's last logits, among the tokens allowed_WK allows (structured output's packed
    mask; all for the others). prompt_ids_WT holds prompt p in its first num_prompt_W[p] entries.
    A row of max_batch or more is a padding entry: its state is dropped, its outputs are junk."""
    W, V = last_logits_WV.shape
    assert V == slots.rows.seen_BV.shape[1]
    assert prompt_ids_WT.shape[0] == W
    assert rows_W.shape == (W,)
    in_prompt_WT = jnp.arange(prompt_ids_WT.shape[1])[None, :] < num_prompt_W[:, None]
    rows_WT = jnp.broadcast_to(jnp.arange(W)[:, None], prompt_ids_WT.shape)
    S = slots.rows.history_BS.shape[1]
    history_WS = write_tokens(jnp.zeros((W, S), jnp.int32), jnp.zeros((W,), jnp.int32), prompt_ids_WT, num_prompt_W)
    hits_W, trials_W = prior_evidence(W)
    new = RowState(
        seen_BV=jnp.zeros((W, V), jnp.bool_).at[rows_WT, prompt_ids_WT].max(in_prompt_WT),
        counts_BV=jnp.zeros((W, V), jnp.int32),
        done_B=jnp.zeros((W,), jnp.bool_),
        keys_B2=keys_W2,
        step_B=jnp.zeros((W,), jnp.int32),
        pending_B=jnp.zeros((W,), jnp.int32),
        limit_B=limit_W,
        logprobs_B=want_logprobs_W,
        params=params_W,
        history_BS=history_WS,
        hits_B=hits_W,
        trials_B=trials_W,
    )
    new, outputs = pick(new, apply_allowed_words(last_logits_WV, allowed_WK), use_kernel)
    history_WS = new.history_BS.at[jnp.arange(W), num_prompt_W].set(new.pending_B, mode="drop")  # the pending token
    new = dataclasses.replace(new, history_BS=history_WS)
    rows = jax.tree.map(lambda all_B, new_W: all_B.at[rows_W].set(new_W, mode="drop"), slots.rows, new)
    old = slots.cache
    cache = dataclasses.replace(
        old, start_B=old.start_B.at[rows_W].set(0, mode="drop"), end_B=old.end_B.at[rows_W].set(num_prompt_W, mode="drop")
    )
    return Slots(cache, rows), outputs


def prefill_rows(
    slots: Slots, ids_WT: jax.Array, num_prompt_W: jax.Array, rows_W: jax.Array, next_ids_WT: jax.Array,
    want_prompt_logprobs: jax.Array, keys_W2: jax.Array, params_W: SamplingParams, limit_W: jax.Array,
    want_logprobs_W: jax.Array, allowed_WK: jax.Array, weights: GPT2Weights, config: GPT2Config,
) -> tuple[Slots, tuple[jax.Array, ...], tuple[jax.Array, ...]]:  # fmt: skip
    """W short prompts (right-padded to T) at once, straight into their rows: one batched pass over a
    fresh cache of T slots (as generate prefills), its slots written to slots [0, T) of rows_W, and
    each prompt's first token picked (`admit`). For prompts that need no staging: each fits one chunk
    and has no prefix block to reuse. A row of max_batch or more is a padding entry, dropped. Cheaper
    than W staging prefills of one row: the weights are read once and attention spans T slots, not
    the staging cache's S.

    Returns the slots, admit's outputs, and the prompt logprobs of every row (position t of row p:
    log_softmax at t of next_ids_WT[p, t], and the top A), computed only when want_prompt_logprobs:
    scoring requests (evaluation harnesses) are batched this way, W prompts in one pass."""
    W, T = ids_WT.shape
    assert T <= slots.cache.max_len
    assert num_prompt_W.shape == (W,)
    assert next_ids_WT.shape == (W, T)
    kv_dtype = slots.cache.kv_dtype
    hidden_WTD, fresh = transformer_from_empty(ids_WT, jnp.zeros((W,), jnp.int32), T, weights, config, kv_dtype)

    def prompt_logprobs() -> tuple[jax.Array, ...]:
        logprobs = token_logprobs(lm_logits(hidden_WTD, weights).reshape(W * T, config.vocab_size),
                                  next_ids_WT.reshape(W * T), TOP_LOGPROBS, weights.use_kernels)  # fmt: skip
        return tuple(part.reshape(W, T, *part.shape[1:]) for part in logprobs)

    def no_prompt_logprobs() -> tuple[jax.Array, ...]:
        return tuple(part.reshape(W, T, *part.shape[1:]) for part in _no_logprobs(W * T))

    prompt_outputs = jax.lax.cond(want_prompt_logprobs, prompt_logprobs, no_prompt_logprobs)
    last_WD = hidden_WTD[jnp.arange(W), num_prompt_W - 1]
    last_logits_WV = lm_logits(last_WD[:, None], weights)[:, 0]
    old = slots.cache
    cache = dataclasses.replace(
        old, k_LBNSH=old.k_LBNSH.at[:, rows_W, :, :T].set(fresh.k_LBNSH, mode="drop"),
        v_LBNSH=old.v_LBNSH.at[:, rows_W, :, :T].set(fresh.v_LBNSH, mode="drop"),
    )  # fmt: skip
    new_slots, outputs = admit(Slots(cache, slots.rows), last_logits_WV, ids_WT, num_prompt_W, rows_W, keys_W2, params_W,
                               limit_W, want_logprobs_W, allowed_WK, weights.use_kernels)  # fmt: skip
    assert outputs[0].shape == (W,)
    assert prompt_outputs[0].shape == (W, T)
    return new_slots, outputs, prompt_outputs


def _take_rows(slots: Slots, width: int) -> Slots:
    """Rows [0, width) of every per-row array; the cache buffers stay whole (see kvcache.py)."""
    cache = slots.cache
    head = KVCache(cache.k_LBNSH, cache.v_LBNSH, cache.start_B[:width], cache.end_B[:width])
    return Slots(head, jax.tree.map(lambda all_B: all_B[:width], slots.rows))


def _put_rows(slots: Slots, head: Slots) -> Slots:
    width = head.rows.done_B.shape[0]
    cache = KVCache(
        head.cache.k_LBNSH, head.cache.v_LBNSH, slots.cache.start_B.at[:width].set(head.cache.start_B),
        slots.cache.end_B.at[:width].set(head.cache.end_B),
    )  # fmt: skip
    return Slots(cache, jax.tree.map(lambda all_B, head_W: all_B.at[:width].set(head_W), slots.rows, head.rows))


def chunk_goes_on(i: jax.Array, num_steps: int, done_W: jax.Array, single_W: jax.Array) -> jax.Array:
    """Whether a chunk runs step i: fewer than num_steps ran, a row is still going, and no running row
    is a `single_W` one past step 0. Where a chunk cannot ask the host for a constrained row's masks
    (speculate_chunk; decode_chunk without the kernel library or on a mesh), every chunk is one step
    while one runs: it makes a token each round as the others do (they lose a round's overhead a
    step; letting them run on left it one token per chunk, 1/num_steps of their rate)."""
    assert done_W.shape == single_W.shape
    assert num_steps >= 1
    constrained_running = jnp.any(single_W & ~done_W)
    return (i < num_steps) & ~jnp.all(done_W) & ((i == 0) | ~constrained_running)


def decode_chunk(
    slots: Slots, allowed_WK: jax.Array, single_W: jax.Array, weights: GPT2Weights, config: GPT2Config, width: int,
    num_steps: int, grammar_table_1: jax.Array | None = None,
) -> tuple[Slots, tuple[jax.Array, ...]]:  # fmt: skip
    """Up to num_steps steps of rows [0, width), each feeding its pending token and picking the next;
    it stops early once every one of those rows is done. A `single_W` row (structured output) picks
    among allowed_WK at step 0 (its grammar's packed mask, computed on the host for that one token).
    Its later masks: with a grammar_table_1 (the host's mask writer, kernels/host_masks.py), the chunk
    asks the host for them at every later step (each row's last pick goes to its grammar, the next
    masks come back), so every row runs the whole chunk; without one (no kernel library, a mesh),
    while a constrained row runs the chunk is that one step (`chunk_goes_on`).

    Returns the slots and (tokens_YW, emitted_YW, logprob_YW, top_ids_YWA, top_logprobs_YWA).
    """
    assert 1 <= width <= slots.rows.done_B.shape[0]
    assert num_steps >= 1
    assert allowed_WK.shape == (width, mask_words(config.vocab_size))
    assert single_W.shape == (width,)
    Y, W, A = num_steps, width, TOP_LOGPROBS
    outputs = (
        jnp.zeros((Y, W), jnp.int32), jnp.zeros((Y, W), jnp.bool_), jnp.zeros((Y, W), jnp.float32),
        jnp.zeros((Y, W, A), jnp.int32), jnp.zeros((Y, W, A), jnp.float32),
    )  # fmt: skip
    constrained = jnp.any(single_W)
    no_single_W = jnp.zeros_like(single_W)

    def keep_going(carry) -> jax.Array:
        i, head, _ = carry
        return chunk_goes_on(i, Y, head.rows.done_B, single_W if grammar_table_1 is None else no_single_W)

    def masks(i: jax.Array, head: Slots) -> jax.Array:
        if grammar_table_1 is None:
            return allowed_WK
        ask = lambda: host_masks(grammar_table_1, head.rows.pending_B, head.rows.step_B, allowed_WK.shape[1])  # noqa: E731
        return jax.lax.cond(i > 0, ask, lambda: allowed_WK)

    def step(carry):
        i, head, outputs = carry
        hidden_WTD, cache = transformer(head.rows.pending_B[:, None], head.cache, weights, config)
        # A done row's slots stay as they were: a free row is not a sequence, and must not creep to the end.
        cache = dataclasses.replace(cache, end_B=jnp.where(head.rows.done_B, head.cache.end_B, cache.end_B))
        logits_WV = lm_logits(hidden_WTD, weights)[:, 0]
        logits_WV = jax.lax.cond(
            constrained, lambda x: apply_allowed_words(x, masks(i, head)), lambda x: x, logits_WV
        )  # fmt: skip
        rows, picked = pick(head.rows, logits_WV, weights.use_kernels)
        outputs = tuple(jax.lax.dynamic_update_index_in_dim(out, new, i, axis=0) for out, new in zip(outputs, picked))
        return i + 1, Slots(cache, rows), outputs

    _, head, outputs = jax.lax.while_loop(keep_going, step, (jnp.zeros((), jnp.int32), _take_rows(slots, W), outputs))
    assert outputs[0].shape == (Y, W)
    return _put_rows(slots, head), outputs


def _draft_plan(head: Slots, single_W: jax.Array, lookup: PromptLookup, costs) -> tuple[jax.Array, ...]:
    """An iteration's verify input: ids_WT = [pending, lookup draft] at the widest draft width, each
    row's draft length and the index (into lookup.widths) of the width to verify. Rows reporting
    logprobs or under a grammar draft nothing: their tokens come from plain picks, which carry both."""
    rows, cache = head.rows, head.cache
    W = rows.done_B.shape[0]
    assert single_W.shape == (W,)
    running_W = ~rows.done_B
    draft_WT, found_W = lookup_draft(rows.history_BS, cache.start_B, cache.end_B, lookup)
    found_W &= running_W & ~single_W & ~rows.logprobs_B
    limit_W = jnp.clip(rows.limit_B - rows.step_B - 1, 0, lookup.max_draft)  # a pick follows the drafts
    width_index = choose_width(rows.hits_B, rows.trials_B, found_W, limit_W, running_W, lookup, costs)
    draft_len_W = jnp.where(found_W, jnp.minimum(limit_W, jnp.asarray(lookup.widths)[width_index]), 0)
    pending_W1 = rows.pending_B[:, None]
    ids_WT = jnp.concatenate([pending_W1, jnp.where(found_W[:, None], draft_WT, pending_W1)], axis=1)
    assert ids_WT.shape == (W, lookup.max_draft + 1)
    return ids_WT, draft_len_W, width_index


def _accepted(logits_WTV: jax.Array, ids_WT: jax.Array, draft_len_W: jax.Array, rows: RowState,
              running_W: jax.Array) -> jax.Array:  # fmt: skip
    """The draft tokens ids_WT[:, 1:] each row accepts (speculate.accept_drafts, q one-hot: a lookup)."""
    W, T, V = logits_WTV.shape
    assert ids_WT.shape == (W, T)
    if T == 1:
        return jnp.zeros((W,), jnp.int32)
    # The pending token is among the row's counts already; accept_drafts counts ids_WT[:, 0] itself.
    counts_WV = rows.counts_BV.at[jnp.arange(W), rows.pending_B].add(-running_W.astype(jnp.int32))
    accept_keys_W2 = accept_keys(jax.vmap(jax.random.fold_in)(rows.keys_B2, rows.step_B))
    flags = runtime_flags(rows.params, running_W)
    accepted_W, _ = accept_drafts(logits_WTV, ids_WT, draft_len_W, rows.seen_BV, counts_WV, rows.params, flags,
                                  accept_keys_W2, None)  # fmt: skip
    assert accepted_W.shape == (W,)
    return jnp.where(running_W, accepted_W, 0)


def _kept_drafts(
    drafts_WT: jax.Array, accepted_W: jax.Array, rows: RowState, running_W: jax.Array
) -> tuple[jax.Array, jax.Array, RowState]:
    """How many accepted drafts each row emits (through its first end token), whether one ended it,
    and the row state with them counted as picked."""
    W, T = drafts_WT.shape
    assert accepted_W.shape == (W,)
    if T == 0:
        return jnp.zeros((W,), jnp.int32), jnp.zeros((W,), jnp.bool_), rows
    kept_W, end_hit_W = emitted_lengths(drafts_WT, accepted_W, rows.params.end_ids_BU)
    kept_W, end_hit_W = jnp.where(running_W, kept_W, 0), end_hit_W & running_W
    seen_BV, counts_BV = count_emitted(rows.seen_BV, rows.counts_BV, drafts_WT, kept_W)
    rows = dataclasses.replace(
        rows, seen_BV=seen_BV, counts_BV=counts_BV, step_B=rows.step_B + kept_W, done_B=rows.done_B | end_hit_W
    )
    assert kept_W.shape == (W,)
    return kept_W, end_hit_W, rows


@dataclasses.dataclass(frozen=True)
class _Iteration:
    """What one speculative iteration made, per row (inside one trace: never a loop's carry)."""

    tokens_WT: jax.Array  # int32: the kept drafts, then the picked token
    count_W: jax.Array  # int32: tokens of tokens_WT emitted
    kept_W: jax.Array  # int32: drafts emitted (the picked token sits at this index)
    accepted_W: jax.Array  # int32: drafts the model accepted
    draft_len_W: jax.Array  # int32: drafts verified
    picked: tuple  # pick's outputs: token_W, emitted_W, logprob_W, top_ids_WA, top_logprobs_WA


def _speculative_step(
    head: Slots, plan: tuple[jax.Array, ...], single_W: jax.Array, allowed_WK: jax.Array, i: jax.Array, width: int,
    weights: GPT2Weights, config: GPT2Config,
) -> tuple[Slots, _Iteration]:  # fmt: skip
    """One verify pass of [pending, `width` draft tokens] per row, then each running row emits its
    accepted drafts and picks its next token from the logits after the last one it kept.

    A sampling row whose draft d was rejected picks from max(0, p - one_hot(d)), normalized (q of a
    lookup is one-hot): p without d. So every token follows plain sampling's distribution (Leviathan
    et al. 2023). Returns the slots and what the iteration made.
    """
    rows, cache = head.rows, head.cache
    W, V = rows.seen_BV.shape
    ids_WT, draft_len_W = plan[0][:, : width + 1], plan[1]
    running_W = ~rows.done_B
    hidden_WTD, new_cache = transformer(ids_WT, cache, weights, config)
    logits_WTV = lm_logits(hidden_WTD, weights)
    accepted_W = _accepted(logits_WTV, ids_WT, draft_len_W, rows, running_W)
    kept_W, end_hit_W, rows = _kept_drafts(ids_WT[:, 1:], accepted_W, rows, running_W)
    logits_WV = jnp.take_along_axis(logits_WTV, accepted_W[:, None, None], axis=1)[:, 0]
    masked = (i == 0) & jnp.any(single_W)
    logits_WV = jax.lax.cond(masked, lambda x: apply_allowed_words(x, allowed_WK), lambda x: x, logits_WV)
    rejected_W = jnp.take_along_axis(ids_WT, jnp.minimum(accepted_W + 1, width)[:, None], axis=1)[:, 0]
    banned_W = jnp.where(accepted_W < draft_len_W, rejected_W, V)
    rows, picked = pick(rows, logits_WV, weights.use_kernels, banned_W)
    end_W = jnp.where(running_W & ~end_hit_W, cache.end_B + 1 + kept_W, cache.end_B)
    history_WS = write_tokens(rows.history_BS, cache.end_B, ids_WT, jnp.where(running_W, width + 1, 0))
    new_end_W = jnp.where(picked[1], end_W, history_WS.shape[1])  # the new pending token sits at the new end
    history_WS = history_WS.at[jnp.arange(W), new_end_W].set(picked[0], mode="drop")
    trials_W = verified_guesses(draft_len_W, accepted_W)
    hits_W, trials_W = decayed_evidence(rows.hits_B, rows.trials_B, accepted_W, trials_W)
    rows = dataclasses.replace(rows, history_BS=history_WS, hits_B=hits_W, trials_B=trials_W)
    tokens_WT = jnp.concatenate([ids_WT[:, 1:], jnp.zeros((W, 1), jnp.int32)], axis=1)
    tokens_WT = tokens_WT.at[jnp.arange(W), kept_W].set(picked[0])
    made = _Iteration(tokens_WT, kept_W + picked[1], kept_W, accepted_W, draft_len_W, picked)
    assert tokens_WT.shape == (W, width + 1)
    return Slots(dataclasses.replace(new_cache, end_B=end_W), rows), made


def _write_outputs(outputs_W: tuple[jax.Array, ...], made_W: jax.Array, made: _Iteration) -> tuple:
    """One iteration's tokens into the chunk's outputs (row w's from slot made_W[w] on); the pick's
    logprobs at its token's slot (a draft token's stay zero: rows wanting logprobs never draft)."""
    tokens_WY, emitted_WY, logprob_WY, top_ids_WYA, top_logprobs_WYA = outputs_W
    tokens_WT, count_W, kept_W = made.tokens_WT, made.count_W, made.kept_W
    _, picked_W, logprob_W, top_ids_WA, top_logprobs_WA = made.picked
    W, Y = tokens_WY.shape
    assert made_W.shape == (W,)
    rows_W, at_W = jnp.arange(W), jnp.where(picked_W, made_W + kept_W, Y)
    outputs_W = (
        write_tokens(tokens_WY, made_W, tokens_WT, count_W), write_tokens(emitted_WY, made_W, jnp.ones_like(tokens_WT, jnp.bool_), count_W),
        logprob_WY.at[rows_W, at_W].set(logprob_W, mode="drop"),
        top_ids_WYA.at[rows_W, at_W].set(top_ids_WA, mode="drop"),
        top_logprobs_WYA.at[rows_W, at_W].set(top_logprobs_WA, mode="drop"),
    )  # fmt: skip
    assert outputs_W[0].shape == (W, Y)
    return outputs_W, made_W + count_W


def speculate_chunk(
    slots: Slots, allowed_WK: jax.Array, single_W: jax.Array, lookup: PromptLookup, weights: GPT2Weights,
    config: GPT2Config, width: int, num_steps: int,
) -> tuple[Slots, tuple[jax.Array, ...], tuple[jax.Array, ...]]:  # fmt: skip
    """decode_chunk with prompt lookup: up to num_steps iterations of rows [0, width), each a verify
    pass of every row's pending token and its draft (`_speculative_step`), the draft width chosen
    per iteration from the rows' recent acceptance (speculate.choose_width; 0: a plain step). Rows
    without a draft, reporting logprobs or under a grammar take plain steps in the same pass.

    Returns the slots, the outputs of decode_chunk with Y = num_steps * (max_draft + 1) (each row's
    tokens from slot 0, emitted_YW marking them) and the chunk's counts (scalars): draft tokens
    verified, draft tokens accepted, verify passes with a draft.
    """
    assert 1 <= width <= slots.rows.done_B.shape[0]
    assert num_steps >= 1
    assert allowed_WK.shape == (width, mask_words(config.vocab_size))
    assert single_W.shape == (width,)
    W, Y, A = width, num_steps * (lookup.max_draft + 1), TOP_LOGPROBS
    costs = lookup.costs(weights.blocks[0].qkv_w_DE.dtype, W)
    outputs_W = (
        jnp.zeros((W, Y), jnp.int32), jnp.zeros((W, Y), jnp.bool_), jnp.zeros((W, Y), jnp.float32),
        jnp.zeros((W, Y, A), jnp.int32), jnp.zeros((W, Y, A), jnp.float32),
    )  # fmt: skip

    def keep_going(carry) -> jax.Array:
        i, head = carry[0], carry[1]
        return chunk_goes_on(i, num_steps, head.rows.done_B, single_W)

    # One while loop per draft width inside one outer loop, as speculate.decode_speculative does (a
    # lax.switch over the widths made XLA copy the KV cache in and out of the conditional).
    def widths_in_turn(carry):
        for index, draft_width in enumerate(lookup.widths):

            def this_width(carry, index=index) -> jax.Array:
                return keep_going(carry) & (carry[2][2] == index)

            def step(carry, draft_width=draft_width):
                i, head, plan, outputs_W, made_W, (drafted, accepted, passes) = carry
                head, made = _speculative_step(head, plan, single_W, allowed_WK, i, draft_width, weights, config)
                outputs_W, made_W = _write_outputs(outputs_W, made_W, made)
                counts = (drafted + jnp.sum(made.draft_len_W), accepted + jnp.sum(made.accepted_W),
                          passes + int(draft_width > 0))  # fmt: skip
                return i + 1, head, _draft_plan(head, single_W, lookup, costs), outputs_W, made_W, counts

            carry = jax.lax.while_loop(this_width, step, carry)
        return carry

    head, zero = _take_rows(slots, W), jnp.zeros((), jnp.int32)
    carry = (zero, head, _draft_plan(head, single_W, lookup, costs), outputs_W, jnp.zeros((W,), jnp.int32),
             (zero, zero, zero))  # fmt: skip
    _, head, _, outputs_W, _, counts = jax.lax.while_loop(keep_going, widths_in_turn, carry)
    outputs = tuple(jnp.swapaxes(out, 0, 1) for out in outputs_W)
    assert outputs[0].shape == (Y, W)
    return _put_rows(slots, head), outputs, counts


def move_slots(slots: Slots, source: jax.Array, target: jax.Array, bucket: int) -> Slots:
    """Copy the first `bucket` cache slots of row `source` to row `target` (the filled part of a row)."""
    L, _, N, S, H = slots.cache.k_LBNSH.shape
    assert bucket <= S
    assert slots.cache.v_LBNSH.shape == slots.cache.k_LBNSH.shape

    def move(cache_LBNSH: jax.Array) -> jax.Array:
        filled_L1NTH = jax.lax.dynamic_slice(cache_LBNSH, (0, source, 0, 0, 0), (L, 1, N, bucket, H))
        return jax.lax.dynamic_update_slice(cache_LBNSH, filled_L1NTH, (0, target, 0, 0, 0))

    return Slots(dataclasses.replace(slots.cache, k_LBNSH=move(slots.cache.k_LBNSH), v_LBNSH=move(slots.cache.v_LBNSH)),
                 slots.rows)  # fmt: skip


def move_state(slots: Slots, source: jax.Array, target: jax.Array) -> Slots:
    """Move row `source`'s state (cache bounds, decode state, settings) to row `target`; `source` is done."""
    assert source.shape == ()
    assert target.shape == ()
    old = slots.cache
    cache = dataclasses.replace(
        old, start_B=old.start_B.at[target].set(old.start_B[source]), end_B=old.end_B.at[target].set(old.end_B[source])
    )
    rows = jax.tree.map(lambda all_B: all_B.at[target].set(all_B[source]), slots.rows)
    return Slots(cache, dataclasses.replace(rows, done_B=rows.done_B.at[source].set(True)))


def release(slots: Slots, free_B: jax.Array) -> Slots:
    """Mark rows done (a stop string hit, or the client went away): they emit nothing more."""
    assert free_B.shape == slots.rows.done_B.shape
    assert free_B.dtype == jnp.bool_
    return Slots(slots.cache, dataclasses.replace(slots.rows, done_B=slots.rows.done_B | free_B))


def read_block(cache: KVCache, row: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values of row `row`'s slots [offset, offset + PREFIX_BLOCK): one prefix-cache block,
    out of the staging cache (row 0) or a decode row that a batched prefill has just written."""
    L, _, N, S, H = cache.k_LBNSH.shape
    assert S >= PREFIX_BLOCK
    shape = (L, 1, N, PREFIX_BLOCK, H)
    return tuple(jax.lax.dynamic_slice(c, (0, row, 0, offset, 0), shape) for c in (cache.k_LBNSH, cache.v_LBNSH))


def restore_block(
    staging: KVCache, k_L1NTH: jax.Array, v_L1NTH: jax.Array, offset: jax.Array, end: jax.Array
) -> KVCache:
    """A cached block back into staging slots [offset, offset + PREFIX_BLOCK); the prompt now ends at
    slot `end` (the block's end; or its last slot, which the next chunk then computes again)."""
    assert k_L1NTH.shape[3] == PREFIX_BLOCK
    assert k_L1NTH.shape == v_L1NTH.shape
    k_LBNSH = jax.lax.dynamic_update_slice(staging.k_LBNSH, k_L1NTH, (0, 0, 0, offset, 0))
    v_LBNSH = jax.lax.dynamic_update_slice(staging.v_LBNSH, v_L1NTH, (0, 0, 0, offset, 0))
    return KVCache(k_LBNSH, v_LBNSH, staging.start_B, jnp.reshape(end, (1,)).astype(jnp.int32))


# The state is only ever made and changed by these programs, so its arrays always arrive as a
# program's outputs (committed to their device): jit's cache key would tell a fresh jnp.zeros apart.
empty_slots_jit = jax.jit(empty_slots, static_argnames=("config", "max_batch", "max_seq_len", "dtype"))
empty_staging_jit = jax.jit(empty_staging, static_argnames=("config", "max_seq_len", "dtype"))
begin_prompt_jit = jax.jit(begin_prompt, donate_argnames=("staging",))
prefill_chunk_jit = jax.jit(prefill_chunk, static_argnames=("config",), donate_argnames=("staging",))
copy_prompt_jit = jax.jit(copy_prompt, static_argnames=("bucket",), donate_argnames=("slots",))
admit_jit = jax.jit(admit, static_argnames=("use_kernel",), donate_argnames=("slots",))
prefill_rows_jit = jax.jit(prefill_rows, static_argnames=("config",), donate_argnames=("slots",))
decode_chunk_jit = jax.jit(decode_chunk, static_argnames=("config", "width", "num_steps"), donate_argnames=("slots",))
speculate_chunk_jit = jax.jit(speculate_chunk, static_argnames=("lookup", "config", "width", "num_steps"),
                              donate_argnames=("slots",))  # fmt: skip
move_slots_jit = jax.jit(move_slots, static_argnames=("bucket",), donate_argnames=("slots",))
move_state_jit = jax.jit(move_state, donate_argnames=("slots",))
release_jit = jax.jit(release, donate_argnames=("slots",))
read_block_jit = jax.jit(read_block)
restore_block_jit = jax.jit(restore_block, donate_argnames=("staging",))
JITTED = (
    empty_slots_jit, empty_staging_jit, begin_prompt_jit,
    prefill_chunk_jit, copy_prompt_jit, admit_jit, prefill_rows_jit, decode_chunk_jit, speculate_chunk_jit,
    move_slots_jit, move_state_jit, release_jit, read_block_jit, restore_block_jit,
)  # fmt: skip


def compiled_count() -> int:
    """How many programs the engine's jitted functions hold: constant once warmed up."""
    counts = [jitted._cache_size() for jitted in JITTED]
    assert len(counts) == len(JITTED)
    assert all(count >= 0 for count in counts)
    return sum(counts)
