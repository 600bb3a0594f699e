"""Text generation: one jitted function for prefill plus the whole decode loop, ragged batches by
left padding, and a streaming variant that decodes a few steps per dispatch.

    prompts (ragged lists) --pad left to a length bucket--> ids_BT, start_B
    prefill: the prompt through the model, the cache filled to the bucket, next-token logits
    decode: lax.while_loop { pick a token per row, write it, run it through the model }
            until every row has emitted an eos or max_new_tokens steps have run

Prompt lengths and step counts are rounded up to buckets, so a new prompt length inside a known
bucket reuses the compiled function. The per-row pieces (`prefill`, `decode`) are exposed for
people who build their own loop (the server does).
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_gpt2.config import GPT2Config
from jax_gpt2.kvcache import KVCache, check_kv_dtype
from jax_gpt2.model import lm_logits, transformer, transformer_from_empty
from jax_gpt2.sharding import fetch, pad_rows, padded_rows, put, put_rows
from jax_gpt2.sampling import (
    SamplerFlags, SamplingParams, SamplingSettings, apply_allowed_words, check_token_settings, choose_tokens,
    end_token_ids, flags_for, mask_words, pick_logits, row_keys, sampling_params,
)
from jax_gpt2.speculate import (
    DraftModel, PromptLookup, SpeculationStats, check_draft_vocabulary, decode_speculative, start_speculating,
)
from jax_gpt2.weights import GPT2Weights

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from jax_gpt2.constraints import CompiledConstraint

PAD_ID = 0  # what a finished row (or a left-pad slot) holds; never attended to, never returned


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: KVCache
    logits_BV: jax.Array  # float32 next-token logits of each row
    seen_BV: jax.Array  # bool: the token occurs in the row so far (for the repetition penalty)
    counts_BV: jax.Array  # int32: how often the token occurs in the row's output (frequency/presence penalties)
    done_B: jax.Array  # bool: the row has emitted an eos
    keys_B2: jax.Array  # uint32 (B, 2): each row's own random key, so a row samples alike alone or batched
    step_B: jax.Array  # int32: decode steps each row has taken (its random key is folded with it)


def bucket_length(n: int) -> int:
    """Round a length up: powers of two to 64, then multiples of 64 (few compiles, little padding)."""
    assert n >= 1
    bucket = 8
    while bucket < n and bucket < 64:
        bucket *= 2
    if bucket < n:
        bucket = -(-n // 64) * 64
    assert bucket >= n
    return bucket


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids_BT with each prompt right-aligned in `length` slots, and start_B, where each one begins."""
    assert len(prompts) >= 1
    assert all(1 <= len(prompt) <= length for prompt in prompts)
    ids_BT = np.full((len(prompts), length), PAD_ID, np.int32)
    start_B = np.array([length - len(prompt) for prompt in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        ids_BT[row, start_B[row] :] = prompt
    return ids_BT, start_B


def prefill(
    ids_BT: jax.Array, start_B: jax.Array, keys_B2: jax.Array, weights: GPT2Weights, config: GPT2Config, max_len: int,
    kv_dtype=jnp.float32,
) -> DecodeState:  # fmt: skip
    """Run left-padded prompts through the model into a fresh cache of max_len slots, stored as kv_dtype."""
    B, T = ids_BT.shape
    assert start_B.shape == (B,)
    assert max_len >= T
    hidden_BTD, cache = transformer_from_empty(ids_BT, start_B, max_len, weights, config, kv_dtype)
    logits_BV = lm_logits(hidden_BTD[:, -1:], weights)[:, 0]
    is_real_BT = jnp.arange(T)[None, :] >= start_B[:, None]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    seen_BV = jnp.zeros((B, config.vocab_size), jnp.bool_).at[rows_BT, ids_BT].max(is_real_BT)
    counts_BV = jnp.zeros((B, config.vocab_size), jnp.int32)
    state = DecodeState(cache, logits_BV, seen_BV, counts_BV, jnp.zeros((B,), jnp.bool_), keys_B2, jnp.zeros((B,), jnp.int32))
    assert state.logits_BV.shape == (B, config.vocab_size)
    return state


def pick_next(state: DecodeState, params: SamplingParams, flags: SamplerFlags) -> tuple[jax.Array, jax.Array]:
    """The next token of each row from its current logits (PAD_ID once the row is done), and the
    processed logits it was picked from."""
    B = state.done_B.shape[0]
    assert state.logits_BV.shape[0] == B
    step_keys_B = jax.vmap(jax.random.fold_in)(state.keys_B2, state.step_B)
    picked_BV = pick_logits(state.logits_BV, state.seen_BV, state.counts_BV, params, flags)
    token_B = jnp.where(state.done_B, PAD_ID, choose_tokens(picked_BV, params, step_keys_B, flags))
    assert token_B.shape == (B,)
    return token_B, picked_BV


def decode_step(
    state: DecodeState, eos_U: jax.Array, params: SamplingParams, weights: GPT2Weights, config: GPT2Config,
    flags: SamplerFlags,
) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """One token per row: pick it, write it into the cache, run it through the model.

    Returns the new state, token_B (PAD_ID where the row was already done), emitted_B, and
    picked_BV, the logits the token was picked from (see `pick_logits`; unused outputs cost nothing
    under jit).
    """
    B = state.done_B.shape[0]
    assert eos_U.ndim == 1
    assert state.step_B.shape == (B,)
    token_B, picked_BV = pick_next(state, params, flags)
    hidden_BTD, cache = transformer(token_B[:, None], state.cache, weights, config)
    new_state = DecodeState(
        cache=cache,
        logits_BV=lm_logits(hidden_BTD, weights)[:, 0],
        seen_BV=state.seen_BV.at[jnp.arange(B), token_B].set(True),
        counts_BV=state.counts_BV.at[jnp.arange(B), token_B].add((~state.done_B).astype(jnp.int32)),
        done_B=state.done_B | jnp.isin(token_B, eos_U),
        keys_B2=state.keys_B2,
        step_B=state.step_B + 1,
    )
    assert new_state.logits_BV.shape == state.logits_BV.shape
    return new_state, token_B, ~state.done_B, picked_BV


def decode(
    state: DecodeState,
    max_steps: jax.Array,
    eos_U: jax.Array,
    params: SamplingParams,
    weights: GPT2Weights,
    config: GPT2Config,
    flags: SamplerFlags,
    num_slots: int,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Up to min(max_steps, num_slots) decode steps, stopping early once every row is done.

    Returns the new state, tokens_BY and emitted_BY (False where the row had already finished).
    """
    B = state.done_B.shape[0]
    assert eos_U.ndim == 1
    assert num_slots >= 1
    tokens_BY = jnp.full((B, num_slots), PAD_ID, jnp.int32)
    emitted_BY = jnp.zeros((B, num_slots), jnp.bool_)

    def keep_going(carry):
        i, state, _, _ = carry
        return (i < jnp.minimum(max_steps, num_slots)) & ~jnp.all(state.done_B)

    def step(carry):
        i, state, tokens_BY, emitted_BY = carry
        state, token_B, emitted_B, _ = decode_step(state, eos_U, params, weights, config, flags)
        tokens_BY = jax.lax.dynamic_update_slice(tokens_BY, token_B[:, None], (0, i))
        emitted_BY = jax.lax.dynamic_update_slice(emitted_BY, emitted_B[:, None], (0, i))
        return i + 1, state, tokens_BY, emitted_BY

    carry = (jnp.zeros((), jnp.int32), state, tokens_BY, emitted_BY)
    _, state, tokens_BY, emitted_BY = jax.lax.while_loop(keep_going, step, carry)
    return state, tokens_BY, emitted_BY


@functools.partial(jax.jit, static_argnames=("config", "flags", "num_slots", "kv_dtype"))
def _generate_jit(ids_BT, start_B, keys_B2, max_steps, eos_U, params, weights, config, flags, num_slots, kv_dtype):
    state = prefill(ids_BT, start_B, keys_B2, weights, config, ids_BT.shape[1] + num_slots, kv_dtype)
    # The last token needs picking but no forward pass (its logits would never be used): decode
    # max_steps - 1 full steps, then pick once more. Saves one whole-model step per call.
    state, tokens_BY, emitted_BY = decode(state, max_steps - 1, eos_U, params, weights, config, flags, num_slots)
    token_B, _ = pick_next(state, params, flags)
    tokens_BY = jax.lax.dynamic_update_slice(tokens_BY, token_B[:, None], (0, max_steps - 1))
    emitted_BY = jax.lax.dynamic_update_slice(emitted_BY, ~state.done_B[:, None], (0, max_steps - 1))
    return tokens_BY, emitted_BY


@functools.partial(jax.jit, static_argnames=("config", "flags", "num_slots", "kv_dtype"))
def _generate_speculative_jit(
    ids_BT, start_B, keys_B2, max_steps, eos_U, params, weights, config, flags, num_slots, kv_dtype, speculate
):  # fmt: skip
    state = prefill(ids_BT, start_B, keys_B2, weights, config, ids_BT.shape[1] + num_slots, kv_dtype)
    state = start_speculating(state, ids_BT, speculate)
    state, tokens_BY, counts_B = decode_speculative(
        state, max_steps, eos_U, params, flags, speculate, weights, config, PAD_ID, num_slots, num_slots
    )
    return tokens_BY, counts_B, SpeculationStats.of(state)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "kv_dtype"))
def _start_speculating_jit(ids_BT, start_B, keys_B2, weights, config, max_len, kv_dtype, speculate):
    return start_speculating(prefill(ids_BT, start_B, keys_B2, weights, config, max_len, kv_dtype), ids_BT, speculate)


@functools.partial(
    jax.jit, static_argnames=("config", "flags", "num_slots", "max_iterations"), donate_argnames=("state",)
)
def _decode_speculative_jit(
    state, max_new, eos_U, params, weights, config, flags, speculate, num_slots, max_iterations
):  # fmt: skip
    return decode_speculative(
        state, max_new, eos_U, params, flags, speculate, weights, config, PAD_ID, num_slots, max_iterations
    )


@functools.partial(jax.jit, static_argnames=("config", "max_len", "kv_dtype"))
def _prefill_jit(ids_BT, start_B, keys_B2, weights, config, max_len, kv_dtype):
    return prefill(ids_BT, start_B, keys_B2, weights, config, max_len, kv_dtype)


@functools.partial(jax.jit, static_argnames=("config", "flags", "num_slots"), donate_argnames=("state",))
def _decode_jit(state, max_steps, eos_U, params, weights, config, flags, num_slots):
    return decode(state, max_steps, eos_U, params, weights, config, flags, num_slots)


@functools.partial(jax.jit, static_argnames=("config", "flags"), donate_argnames=("state",))
def _constrained_step_jit(state, allowed_BK, ended_B, eos_U, params, weights, config, flags):
    """One decode step whose pick obeys each row's packed mask of allowed tokens; ended_B ends rows
    (their answer is complete)."""
    state = dataclasses.replace(state, logits_BV=apply_allowed_words(state.logits_BV, allowed_BK),
                                done_B=state.done_B | ended_B)  # fmt: skip
    state, token_B, emitted_B, _ = decode_step(state, eos_U, params, weights, config, flags)
    return state, token_B, emitted_B


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Validated host-side inputs of one generate call, ready for the device."""

    ids_BT: np.ndarray
    start_B: np.ndarray
    keys_B2: np.ndarray
    eos_U: np.ndarray
    params: SamplingParams
    flags: SamplerFlags
    max_new_tokens: int


def _check_prompts(prompt_ids, config: GPT2Config, max_new_tokens: int) -> list[list[int]]:
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of prompts, each a list of token ids")
    prompts = [list(prompt) for prompt in prompt_ids]
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty: every prompt needs at least one token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt {row} must hold integer token ids")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompt {row} has ids outside [0, {config.vocab_size}): [{min(prompt)}, {max(prompt)}]")
        if len(prompt) + max_new_tokens > config.n_positions:
            raise ValueError(
                f"prompt {row} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it would need "
                f"{len(prompt) + max_new_tokens} positions but the model has n_positions={config.n_positions}"
            )
    return [[int(t) for t in prompt] for prompt in prompts]


def _eos_list(eos_token_id, config: GPT2Config) -> list[int]:
    eos = [] if eos_token_id is None else [eos_token_id] if np.ndim(eos_token_id) == 0 else list(eos_token_id)
    for token in eos:
        if not 0 <= int(token) < config.vocab_size:
            raise ValueError(f"eos_token_id {token} is outside [0, {config.vocab_size})")
    return [int(token) for token in eos]


def _end_ids(eos_token_id, config: GPT2Config, settings: SamplingSettings) -> list[int]:
    """The tokens that end a row: eos_token_id (unless settings.ignore_eos) and settings.stop_token_ids."""
    eos = _eos_list(eos_token_id, config)
    check_token_settings(settings, config.vocab_size)
    return list(end_token_ids(settings, eos))


def settings_from_arguments(
    max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, logit_bias=None, frequency_penalty=0.0,
    presence_penalty=0.0,
) -> SamplingSettings:  # fmt: skip
    """generate's keyword arguments (None meaning off) as SamplingSettings, which checks them."""
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> value; got {type(logit_bias).__name__}")
    return SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=0 if top_k is None else top_k,
        top_p=1.0 if top_p is None else top_p, min_p=0.0 if min_p is None else min_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, seed=seed,
        logit_bias=tuple((logit_bias or {}).items()), frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )  # fmt: skip


def prepare_request(prompt_ids, config: GPT2Config, settings: SamplingSettings, eos_token_id) -> GenerationRequest:
    """Check the prompts on the host (clear ValueErrors) and lay them out for the device."""
    assert isinstance(settings, SamplingSettings)
    assert settings.max_new_tokens >= 1
    prompts = _check_prompts(prompt_ids, config, settings.max_new_tokens)
    ids_BT, start_B = left_pad(prompts, bucket_length(max(len(prompt) for prompt in prompts)))
    keys_B2 = row_keys(settings.seed, range(len(prompts)))
    request = GenerationRequest(
        ids_BT=ids_BT,
        start_B=start_B,
        keys_B2=keys_B2,
        eos_U=np.asarray(_end_ids(eos_token_id, config, settings), np.int32).reshape(-1),
        params=sampling_params([settings] * len(prompts), _eos_list(eos_token_id, config)),
        flags=flags_for([settings]),
        max_new_tokens=settings.max_new_tokens,
    )
    assert request.ids_BT.shape[0] == len(prompts)
    return request


def generate(
    prompt_ids, weights: GPT2Weights, config: GPT2Config, max_new_tokens: int = 64, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
    repetition_penalty: float | None = None, eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
    kv_dtype=jnp.float32, logit_bias: dict[int, float] | None = None, frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0, constraint: "CompiledConstraint | None" = None,
    speculate: PromptLookup | DraftModel | None = None,
) -> list[list[int]]:  # fmt: skip
    """The new tokens of each prompt (a ragged list of id lists), up to and including its eos.

    Prefill and every decode step run inside one jitted call: no per-token Python dispatch.
    max_new_tokens=0 makes nothing (an empty list per prompt, after the same checks).
    kv_dtype jnp.bfloat16 stores the cache in half the bytes (attention math stays float32).
    logit_bias ({token id: value in [-100, 100]}) is added to the logits; frequency_penalty and
    presence_penalty (in [-2, 2]) are OpenAI's, over the tokens generated so far (see sampling.py).
    constraint (constraints.compile_constraint's) keeps every row a prefix of a valid answer and ends
    it once the answer is complete; such a call decodes one step per dispatch (the mask is the host's).
    speculate=PromptLookup() or DraftModel(...) drafts tokens and verifies them several per pass
    (speculate.py): the same greedy tokens, the same sampling distribution, fewer passes over the
    weights. A call takes a constraint or speculate, not both.
    """
    settings = settings_from_arguments(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                       logit_bias, frequency_penalty, presence_penalty)  # fmt: skip
    return generate_with_settings(prompt_ids, weights, config, settings, eos_token_id, kv_dtype, constraint, speculate)


def check_one_decoding_plan(constraint, speculate) -> None:
    """A ValueError for a constraint together with speculation: a constrained row is masked on the host
    one token at a time, while speculation verifies several tokens per pass on the device."""
    if constraint is not None and speculate is not None:
        raise ValueError("constraint and speculate cannot be combined: pass one or the other")


def generate_with_settings(
    prompt_ids, weights: GPT2Weights, config: GPT2Config, settings: SamplingSettings,
    eos_token_id: int | Sequence[int] | None, kv_dtype=jnp.float32, constraint: "CompiledConstraint | None" = None,
    speculate: PromptLookup | DraftModel | None = None,
) -> list[list[int]]:  # fmt: skip
    """`generate` for callers that hold SamplingSettings already (the CLI): the same checks and tokens."""
    assert isinstance(settings, SamplingSettings)
    check_one_decoding_plan(constraint, speculate)
    if constraint is not None:
        _check_constrained(settings)
        steps = stream_with_settings(prompt_ids, weights, config, settings, eos_token_id, kv_dtype, 1, constraint)
        columns = list(steps)
        rows = len(prompt_ids)
        return [[step[row] for step in columns if step[row] is not None] for row in range(rows)]
    kv_dtype = check_kv_dtype(kv_dtype)
    if settings.max_new_tokens == 0:
        _end_ids(eos_token_id, config, settings)
        return [[] for _ in _check_prompts(prompt_ids, config, 0)]
    if speculate is not None:
        return generate_speculative(prompt_ids, weights, config, settings, eos_token_id, kv_dtype, speculate)[0]
    request = prepare_request(prompt_ids, config, settings, eos_token_id)
    B = len(request.ids_BT)
    placed = place_request(request, weights.mesh)
    tokens_BY, emitted_BY = _generate_jit(
        placed.ids_BT, placed.start_B, placed.keys_B2, np.int32(request.max_new_tokens), placed.eos_U,
        placed.params, weights, config, request.flags, bucket_length(request.max_new_tokens), kv_dtype,
    )  # fmt: skip
    tokens_BY, emitted_BY = fetch(tokens_BY)[:B], fetch(emitted_BY)[:B]
    outputs = [tokens_BY[row][emitted_BY[row]].tolist() for row in range(B)]
    assert len(outputs) == len(request.ids_BT)
    return outputs


def check_speculate(speculate, config: GPT2Config) -> None:
    if not isinstance(speculate, (PromptLookup, DraftModel)):
        raise ValueError(
            f"speculate must be None, a jax_gpt2.PromptLookup or a jax_gpt2.DraftModel; got {type(speculate).__name__}"
        )
    check_draft_vocabulary(speculate, config)


def generate_speculative(
    prompt_ids, weights: GPT2Weights, config: GPT2Config, settings: SamplingSettings,
    eos_token_id: int | Sequence[int] | None, kv_dtype, speculate: PromptLookup | DraftModel,
) -> tuple[list[list[int]], SpeculationStats]:  # fmt: skip
    """`generate_with_settings` by speculative decoding, and how the drafts fared (for the bench)."""
    assert settings.max_new_tokens >= 1
    check_speculate(speculate, config)
    request = prepare_request(prompt_ids, config, settings, eos_token_id)
    B = len(request.ids_BT)
    placed = place_request(request, weights.mesh)
    tokens_BY, counts_B, stats = _generate_speculative_jit(
        placed.ids_BT, placed.start_B, placed.keys_B2, np.int32(request.max_new_tokens), placed.eos_U,
        placed.params, weights, config, request.flags, bucket_length(request.max_new_tokens), kv_dtype, speculate,
    )  # fmt: skip
    tokens_BY, counts_B = fetch(tokens_BY)[:B], fetch(counts_B)[:B]
    outputs = [tokens_BY[row, : counts_B[row]].tolist() for row in range(B)]
    assert len(outputs) == B
    return outputs, jax.tree.map(lambda x: fetch(x)[:B], stats)


def prefill_request(placed: GenerationRequest, weights: GPT2Weights, config: GPT2Config, kv_dtype) -> DecodeState:
    """The decode state after a placed request's prompts, its cache sized for its new tokens."""
    max_len = placed.ids_BT.shape[1] + bucket_length(placed.max_new_tokens)
    state = _prefill_jit(placed.ids_BT, placed.start_B, placed.keys_B2, weights, config, max_len, kv_dtype)
    assert state.done_B.shape == (placed.ids_BT.shape[0],)
    assert state.cache.max_len == max_len
    return state


def decode_request(
    state: DecodeState, placed: GenerationRequest, max_steps, chunk_steps: int, weights: GPT2Weights,
    config: GPT2Config,
) -> tuple[DecodeState, jax.Array, jax.Array]:  # fmt: skip
    """Up to min(max_steps, chunk_steps) decode steps of a placed request from `state`, which is
    donated (its buffers are reused for the result: do not read it afterwards)."""
    assert chunk_steps >= 1
    assert state.done_B.shape == (placed.ids_BT.shape[0],)
    return _decode_jit(state, max_steps, placed.eos_U, placed.params, weights, config, placed.flags, chunk_steps)


def place_request(request: GenerationRequest, mesh: "Mesh | None") -> GenerationRequest:
    """The request as the device takes it: unchanged on one device; on a mesh, its rows padded to a
    multiple of the "data" axis (copies of the last row, dropped from the results) and split over it."""
    if mesh is None:
        return request
    rows = padded_rows(len(request.ids_BT), mesh)

    def split(x):
        return put_rows(pad_rows(x, rows), mesh)

    placed = dataclasses.replace(
        request, ids_BT=split(request.ids_BT), start_B=split(request.start_B), keys_B2=split(request.keys_B2),
        params=jax.tree.map(split, request.params), eos_U=put(request.eos_U, mesh, P()),
    )  # fmt: skip
    assert placed.ids_BT.shape[0] == rows
    return placed


def stream_generate(
    prompt_ids, weights: GPT2Weights, config: GPT2Config, max_new_tokens: int = 64, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
    repetition_penalty: float | None = None, eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
    chunk_steps: int = 4, kv_dtype=jnp.float32, logit_bias: dict[int, float] | None = None,
    frequency_penalty: float = 0.0, presence_penalty: float = 0.0, constraint: "CompiledConstraint | None" = None,
    speculate: PromptLookup | DraftModel | None = None,
) -> Iterator[list[int | None]]:  # fmt: skip
    """Like `generate`, but yields as tokens are made: one list per step, a token per row (None once the
    row has finished). The device runs `chunk_steps` steps per dispatch (with speculate: iterations,
    each of one or more tokens per row); the tokens equal `generate`'s.
    A generator: the arguments are checked when the first step is asked for."""
    settings = settings_from_arguments(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                       logit_bias, frequency_penalty, presence_penalty)  # fmt: skip
    yield from stream_with_settings(prompt_ids, weights, config, settings, eos_token_id, kv_dtype, chunk_steps, constraint,
                                    speculate)  # fmt: skip


def stream_with_settings(
    prompt_ids, weights: GPT2Weights, config: GPT2Config, settings: SamplingSettings,
    eos_token_id: int | Sequence[int] | None, kv_dtype=jnp.float32, chunk_steps: int = 4,
    constraint: "CompiledConstraint | None" = None, speculate: PromptLookup | DraftModel | None = None,
) -> Iterator[list[int | None]]:  # fmt: skip
    """`stream_generate` for callers that hold SamplingSettings already: nothing runs (and nothing is
    checked) until the first step is asked for, as with any generator."""
    assert isinstance(settings, SamplingSettings)
    check_one_decoding_plan(constraint, speculate)
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1; got {chunk_steps}")
    kv_dtype = check_kv_dtype(kv_dtype)
    if settings.max_new_tokens == 0:
        _end_ids(eos_token_id, config, settings)
        _check_prompts(prompt_ids, config, 0)
        return
    request = prepare_request(prompt_ids, config, settings, eos_token_id)
    B = len(request.ids_BT)
    placed = place_request(request, weights.mesh)
    if speculate is not None:
        check_speculate(speculate, config)
        yield from stream_speculative(placed, B, weights, config, kv_dtype, chunk_steps, speculate)
        return
    if constraint is not None:
        _check_constrained(settings)
    state = prefill_request(placed, weights, config, kv_dtype)
    if constraint is not None:
        yield from _stream_constrained(state, placed, B, constraint, weights, config)
        return
    remaining = request.max_new_tokens
    while remaining > 0:
        state, tokens_BY, emitted_BY = decode_request(state, placed, np.int32(remaining), chunk_steps, weights, config)
        tokens_BY, emitted_BY = fetch(tokens_BY)[:B], fetch(emitted_BY)[:B]
        for column in range(tokens_BY.shape[1]):
            if not emitted_BY[:, column].any():
                return
            yield [int(t) if e else None for t, e in zip(tokens_BY[:, column], emitted_BY[:, column])]
        remaining -= chunk_steps


def _check_constrained(settings: SamplingSettings) -> None:
    if settings.min_tokens > 0:  # its ban of the end tokens could leave a complete answer nothing to pick
        raise ValueError("min_tokens cannot be combined with a constraint")


def _stream_constrained(
    state: DecodeState, placed: GenerationRequest, B: int, constraint: "CompiledConstraint", weights: GPT2Weights,
    config: GPT2Config,
) -> Iterator[list[int | None]]:  # fmt: skip
    """One step per dispatch: each row's grammar masks its pick (computed here, on the host), and a row
    whose answer is complete ends without another token."""
    if weights.mesh is not None:
        raise ValueError("a constraint runs on one device; load the weights without a mesh")
    if constraint.grammar_tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the constraint was compiled for {constraint.grammar_tokenizer.vocab_size} tokens; "
                         f"the model has {config.vocab_size}")  # fmt: skip
    matchers = [constraint.new_matcher() for _ in range(B)]
    allowed_BK = np.full((B, mask_words(config.vocab_size)), -1, np.int32)  # -1: every token
    for _ in range(placed.max_new_tokens):
        ended_B = np.array([matcher.done for matcher in matchers])
        for row, matcher in enumerate(matchers):
            if not matcher.done:
                matcher.write_allowed(allowed_BK[row])
        state, token_B, emitted_B = _constrained_step_jit(
            state, allowed_BK, ended_B, placed.eos_U, placed.params, weights, config, placed.flags
        )  # fmt: skip
        token_B, emitted_B = fetch(token_B), fetch(emitted_B)
        if not emitted_B.any():
            return
        for row in np.nonzero(emitted_B)[0]:
            matchers[row].advance(int(token_B[row]))
        yield [int(t) if e else None for t, e in zip(token_B, emitted_B)]


def stream_speculative(
    placed: GenerationRequest, B: int, weights: GPT2Weights, config: GPT2Config, kv_dtype, chunk_steps: int,
    speculate: PromptLookup | DraftModel,
) -> Iterator[list[int | None]]:  # fmt: skip
    """`stream_with_settings` by speculative decoding: rows advance by different counts per dispatch,
    so each row's tokens queue on the host and a step is yielded once every unfinished row has one."""
    max_len = placed.ids_BT.shape[1] + bucket_length(placed.max_new_tokens)
    state = _start_speculating_jit(
        placed.ids_BT, placed.start_B, placed.keys_B2, weights, config, max_len, kv_dtype, speculate
    )
    queues: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    while not all(finished) or any(queues):
        if not all(queue or ended for queue, ended in zip(queues, finished)):
            state, tokens_BY, counts_B = _decode_speculative_jit(
                state, np.int32(placed.max_new_tokens), placed.eos_U, placed.params, weights, config, placed.flags,
                speculate, chunk_steps * (speculate.max_draft + 1) + 1, chunk_steps,
            )  # fmt: skip
            tokens_BY, counts_B = fetch(tokens_BY)[:B], fetch(counts_B)[:B]
            done_B, total_B = fetch(state.decode.done_B)[:B], fetch(state.count_B)[:B]
            for row in range(B):
                queues[row] += tokens_BY[row, : counts_B[row]].tolist()
                finished[row] = bool(done_B[row]) or int(total_B[row]) >= placed.max_new_tokens
            continue
        yield [queue.pop(0) if queue else None for queue in queues]
