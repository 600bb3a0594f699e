"""Sampling settings, logits processors and the sampler: pure, jit-friendly, one parameter value per row.

Applied in vLLM's order: logit_bias and min_tokens (an end token is banned until the row has made
min_tokens tokens), then the penalties (repetition over prompt and output as transformers applies it,
then OpenAI's frequency and presence penalties over the output only), then (sampling rows only)
temperature, top-k, top-p, min-p, then a draw from the softmax. Each control has an "off" value so
that rows with different settings share one compiled step (the server batches different requests):

    temperature 0 -> greedy (argmax after the processors above, as transformers' greedy search)
    top_k 0 -> off      top_p 1 -> off      min_p 0 -> off      repetition_penalty 1 -> off
    logit_bias {} -> off (padding entries add 0)       frequency_penalty, presence_penalty 0 -> off
    min_tokens 0 -> off

`SamplingSettings` is what a caller asks for (one request, host values, checked once by its one
validator); `SamplingParams` is the same per row as device arrays. Which processors run at all is
decided by `SamplerFlags`: on the host from the settings (a static argument: a greedy batch never
runs a filter), or at run time from the rows' values (`runtime_flags`: each stage under a
`lax.cond`, for the server, whose rows change while the compiled step does not).
"""

import dataclasses
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.kernels import logsumexp_top_rows

FILTERED = -jnp.inf  # transformers' filter_value: a removed token gets probability exactly 0
MAX_SEED = 2**32 - 1  # PRNGKey keeps 32 bits of the seed; larger seeds would silently collide
MAX_TOP_LOGPROBS = 5  # alternatives per token the logprobs APIs return at most (OpenAI's bound)
MAX_LOGIT_BIAS = 300  # E: logit_bias entries per request at most (OpenAI's bound)
MAX_END_IDS = 16  # U: tokens that end a row at most (eos and stop_token_ids)
MAX_BIAS = 100.0  # |logit_bias value| at most (OpenAI's bound: -100 bans a token, +100 forces it)
MAX_COUNT_PENALTY = 2.0  # |frequency_penalty|, |presence_penalty| at most (OpenAI's bound)


class InvalidSetting(ValueError):
    """A sampling setting out of its range; `field` names it (the server reports it as the bad parameter)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How one request picks its tokens and when it ends; every entry point builds one, and building
    it is the check (`check_settings`): generate, stream_generate, the CLI, the engine, the server."""

    max_new_tokens: int = 64  # 0: make nothing (the server's echo-only scoring requests)
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 is off
    top_p: float = 1.0  # 1 is off
    min_p: float = 0.0  # 0 is off
    repetition_penalty: float = 1.0  # 1 is off
    seed: int = 0
    stop: tuple[str, ...] = ()  # the text ends where one of these first occurs
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value in [-100, 100]) added to the logits
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this times the token's count in the output
    presence_penalty: float = 0.0  # in [-2, 2]: minus this once the token is in the output
    min_tokens: int = 0  # no end token (eos, stop_token_ids) before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the row too (not kept in the text)
    ignore_eos: bool = False  # the model's eos does not end the row (it is kept as a token)
    include_stop_str_in_output: bool = False  # the text ends after the stop string, not before it

    def __post_init__(self) -> None:
        check_settings(self)


def end_token_ids(settings: SamplingSettings, eos_ids: Sequence[int]) -> tuple[int, ...]:
    """The tokens that end a row with these settings: the model's eos (unless ignore_eos), then stop_token_ids."""
    assert all(_is_int(token) for token in eos_ids)
    ends = tuple(dict.fromkeys((() if settings.ignore_eos else tuple(int(t) for t in eos_ids)) + settings.stop_token_ids))
    if len(ends) > MAX_END_IDS:
        raise ValueError(f"at most {MAX_END_IDS} end tokens (eos and stop_token_ids); got {len(ends)}")
    assert len(set(ends)) == len(ends)
    return ends


def check_token_settings(settings: SamplingSettings, vocab_size: int) -> None:
    """The settings' token ids against a vocabulary (settings alone do not know its size)."""
    assert vocab_size >= 1
    for field, ids in (("logit_bias", [t for t, _ in settings.logit_bias]), ("stop_token_ids", settings.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidSetting(field, f"{field} holds token ids outside [0, {vocab_size}): {bad[:5]}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))


@jax.jit
def _fold_rows(seed: jax.Array, indices_W: jax.Array) -> jax.Array:
    """fold_in(PRNGKey(seed), index) for each index, as one compiled call: eager, the vmap alone was
    traced on every call (~1 ms of Python per `generate` call or server request)."""
    assert seed.dtype == jnp.uint32  # PRNGKey of a uint32 seed is [0, seed], as of a Python int in range
    assert indices_W.dtype == jnp.int32
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), indices_W)


def row_keys(seed: int, indices) -> np.ndarray:
    """The random key of each row (uint32, (len(indices), 2)): fold_in(PRNGKey(seed), index). Row i of
    `generate(..., seed=s)` and the server's choice i of a request with seed s share it, so each
    samples alike alone or batched; each step then folds in the row's own step count."""
    indices = np.asarray(indices, np.int32)
    assert indices.ndim == 1
    assert 0 <= seed <= MAX_SEED, "check_settings bounds the seed"
    count = len(indices)
    width = 1 << max(0, count - 1).bit_length()  # power-of-two widths: one compile per width, not per count
    padded_W = np.zeros(width, np.int32)
    padded_W[:count] = indices
    keys_B2 = np.asarray(_fold_rows(np.uint32(seed), padded_W))[:count]
    assert keys_B2.shape == (count, 2)
    assert keys_B2.dtype == np.uint32
    return keys_B2


def check_settings(settings: SamplingSettings) -> None:
    """The one validator of sampling settings: an InvalidSetting naming the field, with its range."""
    s = settings
    if not _is_int(s.max_new_tokens) or s.max_new_tokens < 0:
        raise InvalidSetting("max_new_tokens", f"max_new_tokens must be an integer >= 0; got {s.max_new_tokens!r}")
    if not _is_real(s.temperature) or s.temperature < 0:
        raise InvalidSetting("temperature", f"temperature must be >= 0 (0 is greedy); got {s.temperature!r}")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise InvalidSetting("top_k", f"top_k must be an integer >= 0 (0 is off); got {s.top_k!r}")
    if not _is_real(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidSetting("top_p", f"top_p must be in (0, 1] (1 is off); got {s.top_p!r}")
    if not _is_real(s.min_p) or not 0 <= s.min_p <= 1:
        raise InvalidSetting("min_p", f"min_p must be in [0, 1] (0 is off); got {s.min_p!r}")
    if not _is_real(s.repetition_penalty) or s.repetition_penalty <= 0:
        raise InvalidSetting(
            "repetition_penalty", f"repetition_penalty must be > 0 (1 is off); got {s.repetition_penalty!r}"
        )
    if not _is_int(s.seed) or not 0 <= s.seed <= MAX_SEED:
        raise InvalidSetting("seed", f"seed must be an integer in [0, {MAX_SEED}]; got {s.seed!r}")
    if not isinstance(s.stop, tuple) or not all(isinstance(stop, str) for stop in s.stop):
        raise InvalidSetting("stop", f"stop must be a tuple of strings; got {s.stop!r}")
    if any(not stop for stop in s.stop):
        raise InvalidSetting("stop", "stop strings must be non-empty")
    _check_logit_bias(s.logit_bias)
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(s, name)
        if not _is_real(value) or not -MAX_COUNT_PENALTY <= value <= MAX_COUNT_PENALTY:
            raise InvalidSetting(name, f"{name} must be in [-{MAX_COUNT_PENALTY:g}, {MAX_COUNT_PENALTY:g}] (0 is off); got {value!r}")
    if not _is_int(s.min_tokens) or s.min_tokens < 0:
        raise InvalidSetting("min_tokens", f"min_tokens must be an integer >= 0; got {s.min_tokens!r}")
    if s.min_tokens > s.max_new_tokens:
        raise InvalidSetting("min_tokens", f"min_tokens ({s.min_tokens}) must not exceed max_tokens ({s.max_new_tokens})")
    if not isinstance(s.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in s.stop_token_ids):
        raise InvalidSetting("stop_token_ids", f"stop_token_ids must be a tuple of token ids >= 0; got {s.stop_token_ids!r}")
    if len(s.stop_token_ids) > MAX_END_IDS - 1:  # room for the model's eos
        raise InvalidSetting("stop_token_ids", f"at most {MAX_END_IDS - 1} stop_token_ids; got {len(s.stop_token_ids)}")
    for name in ("ignore_eos", "include_stop_str_in_output"):
        if not isinstance(getattr(s, name), bool):
            raise InvalidSetting(name, f"{name} must be a bool; got {getattr(s, name)!r}")


def _check_logit_bias(logit_bias) -> None:
    if not isinstance(logit_bias, tuple) or not all(isinstance(entry, tuple) and len(entry) == 2 for entry in logit_bias):
        raise InvalidSetting("logit_bias", f"logit_bias must be a tuple of (token id, value) pairs; got {logit_bias!r}")
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidSetting("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} entries; got {len(logit_bias)}")
    ids = [token for token, _ in logit_bias]
    if not all(_is_int(token) and token >= 0 for token in ids):
        raise InvalidSetting("logit_bias", f"logit_bias keys must be token ids >= 0; got {ids[:5]}")
    if len(set(ids)) != len(ids):
        raise InvalidSetting("logit_bias", "logit_bias names a token twice")
    for token, value in logit_bias:
        if not _is_real(value) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise InvalidSetting("logit_bias", f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]; got {value!r} for {token}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature_B: jax.Array  # float32; 0 means greedy
    top_k_B: jax.Array  # int32; 0 means off
    top_p_B: jax.Array  # float32 in (0, 1]; 1 means off
    min_p_B: jax.Array  # float32 in [0, 1]; 0 means off
    repetition_penalty_B: jax.Array  # float32 > 0; 1 means off
    bias_ids_BE: jax.Array  # int32: logit_bias' token ids, padded with 0 ...
    bias_BE: jax.Array  # float32: ... and their values, padded with 0 (adding 0 is off)
    frequency_penalty_B: jax.Array  # float32; 0 means off
    presence_penalty_B: jax.Array  # float32; 0 means off
    min_tokens_B: jax.Array  # int32; 0 means off
    end_ids_BU: jax.Array  # int32: the tokens that end the row (min_tokens bans them), padded with -1


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Which stages any row needs. Python bools (static: unused stages are not even traced) or traced
    bool scalars (`runtime_flags`: each stage runs under a lax.cond, only when some row needs it)."""

    sample: bool | jax.Array  # some row has temperature > 0
    filter: bool | jax.Array  # some sampling row uses top_k, top_p or min_p
    penalize: bool | jax.Array  # some row has repetition_penalty != 1
    bias: bool | jax.Array = False  # some row has a logit_bias
    count_penalty: bool | jax.Array = False  # some row has frequency_penalty or presence_penalty != 0
    hold_end: bool | jax.Array = False  # some row has min_tokens > 0


def sampling_params(settings: Sequence[SamplingSettings], eos_ids: Sequence[int] = ()) -> SamplingParams:
    """One row per settings (host arrays with fixed shapes and dtypes, so new values never recompile);
    eos_ids are the model's end-of-text tokens (a row ends on them unless it ignores eos)."""
    assert len(settings) >= 1
    assert all(isinstance(s, SamplingSettings) for s in settings)
    B = len(settings)
    bias_ids_BE, bias_BE = np.zeros((B, MAX_LOGIT_BIAS), np.int32), np.zeros((B, MAX_LOGIT_BIAS), np.float32)
    end_ids_BU = np.full((B, MAX_END_IDS), -1, np.int32)
    for row, s in enumerate(settings):
        for e, (token, value) in enumerate(s.logit_bias):
            bias_ids_BE[row, e], bias_BE[row, e] = token, value
        ends = end_token_ids(s, eos_ids)
        end_ids_BU[row, : len(ends)] = ends
    params = SamplingParams(
        temperature_B=np.array([s.temperature for s in settings], np.float32),
        top_k_B=np.array([s.top_k for s in settings], np.int32),
        top_p_B=np.array([s.top_p for s in settings], np.float32),
        min_p_B=np.array([s.min_p for s in settings], np.float32),
        repetition_penalty_B=np.array([s.repetition_penalty for s in settings], np.float32),
        bias_ids_BE=bias_ids_BE,
        bias_BE=bias_BE,
        frequency_penalty_B=np.array([s.frequency_penalty for s in settings], np.float32),
        presence_penalty_B=np.array([s.presence_penalty for s in settings], np.float32),
        min_tokens_B=np.array([s.min_tokens for s in settings], np.int32),
        end_ids_BU=end_ids_BU,
    )
    assert params.top_k_B.shape == (B,)
    assert params.end_ids_BU.shape == (B, MAX_END_IDS)
    return params


def flags_for(settings: Sequence[SamplingSettings]) -> SamplerFlags:
    """The stages these rows need, decided on the host (static flags)."""
    assert len(settings) >= 1
    sample = any(s.temperature > 0 for s in settings)
    uses_filter = any(s.temperature > 0 and (s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0) for s in settings)
    penalize = any(s.repetition_penalty != 1.0 for s in settings)
    bias = any(s.logit_bias for s in settings)
    count_penalty = any(s.frequency_penalty != 0 or s.presence_penalty != 0 for s in settings)
    hold_end = any(s.min_tokens > 0 for s in settings)
    return SamplerFlags(sample=sample, filter=uses_filter, penalize=penalize, bias=bias, count_penalty=count_penalty,
                        hold_end=hold_end)  # fmt: skip


def runtime_flags(params: SamplingParams, active_B: jax.Array) -> SamplerFlags:
    """The stages the active rows need, decided on the device from their values (traced flags); an
    inactive row's stale settings (a finished sequence's) switch nothing on."""
    assert params.temperature_B.ndim == 1
    assert active_B.shape == params.temperature_B.shape
    sampling_B = active_B & (params.temperature_B > 0)
    filtering_B = (params.top_k_B > 0) | (params.top_p_B < 1.0) | (params.min_p_B > 0)
    return SamplerFlags(
        sample=jnp.any(sampling_B),
        filter=jnp.any(sampling_B & filtering_B),
        penalize=jnp.any(active_B & (params.repetition_penalty_B != 1.0)),
        bias=jnp.any(active_B & jnp.any(params.bias_BE != 0, axis=-1)),
        count_penalty=jnp.any(active_B & ((params.frequency_penalty_B != 0) | (params.presence_penalty_B != 0))),
        hold_end=jnp.any(active_B & (params.min_tokens_B > 0)),
    )


def when(flag: bool | jax.Array, stage, x_BV: jax.Array) -> jax.Array:
    """stage(x) if flag else x: decided at trace time for a Python bool, at run time for a traced one."""
    if isinstance(flag, bool):
        return stage(x_BV) if flag else x_BV
    assert flag.shape == ()
    return jax.lax.cond(flag, stage, lambda x: x, x_BV)


def apply_repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array, penalty_B: jax.Array) -> jax.Array:
    """Make every token already in the row (prompt or output) less likely: divide a positive logit by
    the penalty, multiply a negative one (CTRL's rule, as transformers applies it)."""
    assert logits_BV.shape == seen_BV.shape
    assert penalty_B.shape == logits_BV.shape[:1]
    penalty_B1 = penalty_B[:, None]
    penalized_BV = jnp.where(logits_BV < 0, logits_BV * penalty_B1, logits_BV / penalty_B1)
    return jnp.where(seen_BV, penalized_BV, logits_BV)


MASK_WORD_BITS = 32  # a packed mask: bit v % 32 of int32 word v // 32 allows token v (llguidance's layout)


def mask_words(vocab_size: int) -> int:
    """The int32 words of one row's packed mask of vocab_size tokens."""
    assert vocab_size >= 1
    words = -(-vocab_size // MASK_WORD_BITS)
    assert words * MASK_WORD_BITS >= vocab_size
    return words


def apply_allowed_words(logits_BV: jax.Array, words_BK: jax.Array) -> jax.Array:
    """`apply_allowed_tokens` with each row's mask packed 32 tokens a word, as the grammar engine
    writes it: the host neither unpacks it nor sends the 8x larger bool array (-1: every token)."""
    B, V = logits_BV.shape
    assert words_BK.shape == (B, mask_words(V))
    assert words_BK.dtype == jnp.int32
    shifts_X = jnp.arange(MASK_WORD_BITS, dtype=jnp.int32)
    bits_BKX = jnp.right_shift(words_BK[:, :, None], shifts_X[None, None, :]) & 1
    allowed_BV = bits_BKX.reshape(B, -1)[:, :V] != 0
    return apply_allowed_tokens(logits_BV, allowed_BV)


def apply_allowed_tokens(logits_BV: jax.Array, allowed_BV: jax.Array) -> jax.Array:
    """Structured output's mask (constraints.py), ahead of every other processor: a token the row's
    grammar does not allow gets FILTERED (an unconstrained row allows every token)."""
    assert allowed_BV.shape == logits_BV.shape
    assert allowed_BV.dtype == jnp.bool_
    return jnp.where(allowed_BV, logits_BV, FILTERED)


def apply_logit_bias(logits_BV: jax.Array, bias_ids_BE: jax.Array, bias_BE: jax.Array) -> jax.Array:
    """Add each row's logit_bias values at their token ids (padding entries add 0 to token 0)."""
    B = logits_BV.shape[0]
    assert bias_ids_BE.shape == bias_BE.shape
    assert bias_ids_BE.shape[0] == B
    rows_BE = jnp.broadcast_to(jnp.arange(B)[:, None], bias_ids_BE.shape)
    return logits_BV.at[rows_BE, bias_ids_BE].add(bias_BE)


def apply_count_penalties(
    logits_BV: jax.Array, counts_BV: jax.Array, frequency_B: jax.Array, presence_B: jax.Array
) -> jax.Array:  # fmt: skip
    """OpenAI's penalties: logits[j] -= count[j] * frequency + (count[j] > 0) * presence, where count[j]
    is how often token j occurs among the row's generated tokens (the prompt does not count)."""
    assert counts_BV.shape == logits_BV.shape
    assert frequency_B.shape == presence_B.shape == logits_BV.shape[:1]
    counts_BV = counts_BV.astype(jnp.float32)
    penalty_BV = counts_BV * frequency_B[:, None] + (counts_BV > 0) * presence_B[:, None]
    return logits_BV - penalty_BV


def hold_end_tokens(logits_BV: jax.Array, counts_BV: jax.Array, min_tokens_B: jax.Array, end_ids_BU: jax.Array) -> jax.Array:
    """Ban each row's end tokens (FILTERED) while it has made fewer than min_tokens tokens."""
    B = logits_BV.shape[0]
    assert counts_BV.shape == logits_BV.shape
    assert end_ids_BU.shape[0] == B
    made_B = jnp.sum(counts_BV, axis=-1)
    holding_BU = (made_B < min_tokens_B)[:, None] & (end_ids_BU >= 0)
    rows_BU = jnp.broadcast_to(jnp.arange(B)[:, None], end_ids_BU.shape)
    # Padding (-1) and rows not holding point past the vocabulary: dropped.
    ids_BU = jnp.where(holding_BU, end_ids_BU, logits_BV.shape[1])
    return logits_BV.at[rows_BU, ids_BU].set(FILTERED, mode="drop")


# Top-k and top-p need one threshold per row (the k-th best logit; the smallest logit kept by top-p),
# not the sorted vocabulary: each is found by bisection over the logits' 32-bit order keys, 32
# passes of a compare and a sum. XLA's CPU sort of one 50257-wide row takes ~10 ms, of 8 rows ~75 ms
# (more than a batch-8 gpt2 decode step); the bisections take ~1.5 and ~3.5 ms (2-core Zen 4).
KEY_BITS = 32


def order_keys(x_BV: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values (for every value but NaN): a negative value's
    bits flipped, a positive one's sign bit set."""
    assert x_BV.dtype == jnp.float32
    assert x_BV.ndim == 2
    bits_BV = jax.lax.bitcast_convert_type(x_BV, jnp.uint32)
    keys_BV = jnp.where(bits_BV >> 31 == 1, ~bits_BV, bits_BV | jnp.uint32(0x80000000))
    assert keys_BV.dtype == jnp.uint32
    return keys_BV


def from_order_keys(keys_B: jax.Array) -> jax.Array:
    """The float32 values of order keys (`order_keys` undone)."""
    assert keys_B.dtype == jnp.uint32
    bits_B = jnp.where(keys_B >> 31 == 1, keys_B & jnp.uint32(0x7FFFFFFF), ~keys_B)
    values_B = jax.lax.bitcast_convert_type(bits_B, jnp.float32)
    assert values_B.shape == keys_B.shape
    return values_B


def lowest_light_key(keys_BV: jax.Array, weights_BV: jax.Array, limit_B: jax.Array) -> jax.Array:
    """Each row's smallest key v whose strictly greater keys weigh less than limit (limit > 0, so the
    row's largest key qualifies), by bisection. The weight above v only changes at a key of the row,
    so v is one of them."""
    B = keys_BV.shape[0]
    assert weights_BV.shape == keys_BV.shape
    assert limit_B.shape == (B,)

    def halve(_, bounds):  # invariant: hi qualifies, nothing below lo does
        lo_B, hi_B = bounds
        mid_B = lo_B + ((hi_B - lo_B) >> 1)
        light_B = jnp.sum(jnp.where(keys_BV > mid_B[:, None], weights_BV, 0), axis=-1) < limit_B
        return jnp.where(light_B, lo_B, mid_B + 1), jnp.where(light_B, mid_B, hi_B)

    bounds = (jnp.min(keys_BV, axis=-1), jnp.max(keys_BV, axis=-1))
    lowest_B, _ = jax.lax.fori_loop(0, KEY_BITS, halve, bounds)
    assert lowest_B.shape == (B,)
    return lowest_B


def kth_largest(logits_BV: jax.Array, k_B: jax.Array) -> jax.Array:
    """Each row's k-th largest logit (k in [1, V]): the smallest one with fewer than k logits above it."""
    assert k_B.shape == logits_BV.shape[:1]
    assert logits_BV.ndim == 2
    keys_BV = order_keys(logits_BV)
    return from_order_keys(lowest_light_key(keys_BV, jnp.ones(keys_BV.shape, jnp.int32), k_B))


def top_p_cutoff(logits_BV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Each row's smallest logit that top-p keeps: the smallest one whose strictly better tokens hold
    less than top_p of the probability."""
    assert top_p_B.shape == logits_BV.shape[:1]
    assert logits_BV.ndim == 2
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    return from_order_keys(lowest_light_key(order_keys(logits_BV), probs_BV, top_p_B))


def apply_top_k(logits_BV: jax.Array, top_k_B: jax.Array) -> jax.Array:
    """Keep the tokens scoring at least the k-th best (ties at the k-th all stay, as in transformers);
    top_k 0 keeps every token."""
    vocab = logits_BV.shape[-1]
    assert top_k_B.shape == logits_BV.shape[:1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_B1 = kth_largest(logits_BV, k_B)[:, None]
    filtered_BV = jnp.where(logits_BV < kth_B1, FILTERED, logits_BV)
    assert filtered_BV.shape == logits_BV.shape
    return filtered_BV


def apply_top_p(logits_BV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Keep the smallest set of best tokens whose probability reaches top_p (the best token always stays).

    transformers removes a token when the probability of all tokens at or below it is <= 1 - top_p;
    in descending order that is: the probability of the tokens strictly above it is >= top_p. The
    kept tokens are the best ones down to a cutoff logit (`top_p_cutoff`); top_p 1 keeps every token.
    """
    assert top_p_B.shape == logits_BV.shape[:1]
    assert logits_BV.ndim == 2
    cutoff_B1 = jnp.where(top_p_B >= 1.0, -jnp.inf, top_p_cutoff(logits_BV, top_p_B))[:, None]
    filtered_BV = jnp.where(logits_BV < cutoff_B1, FILTERED, logits_BV)
    assert filtered_BV.shape == logits_BV.shape
    return filtered_BV


def apply_min_p(logits_BV: jax.Array, min_p_B: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p times the best token's probability (min_p 0: none)."""
    assert min_p_B.shape == logits_BV.shape[:1]
    assert logits_BV.ndim == 2
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = min_p_B[:, None] * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < threshold_B1, FILTERED, logits_BV)


def warp_for_sampling(logits_BV: jax.Array, params: SamplingParams, flags: SamplerFlags) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: the distribution a sampling row draws from."""
    assert flags.sample is not False
    assert logits_BV.ndim == 2
    temperature_B1 = jnp.where(params.temperature_B > 0, params.temperature_B, 1.0)[:, None]

    def filtered(logits_BV: jax.Array) -> jax.Array:
        logits_BV = when(jnp.any(params.top_k_B > 0), lambda x: apply_top_k(x, params.top_k_B), logits_BV)
        logits_BV = when(jnp.any(params.top_p_B < 1.0), lambda x: apply_top_p(x, params.top_p_B), logits_BV)
        return apply_min_p(logits_BV, params.min_p_B)  # min_p 0 removes nothing

    return when(flags.filter, filtered, logits_BV / temperature_B1)


def pick_logits(
    logits_BV: jax.Array, seen_BV: jax.Array, counts_BV: jax.Array, params: SamplingParams, flags: SamplerFlags
) -> jax.Array:  # fmt: skip
    """The logits each row's next token is picked from: logit_bias, min_tokens, the penalties, then for
    sampling rows warped (temperature, top-k, top-p, min-p). A greedy row takes their argmax, a
    sampling row draws from their softmax; so their log-softmax is the distribution a token was chosen
    from. seen_BV: the token is in the prompt or the output; counts_BV: its count in the output."""
    assert logits_BV.ndim == 2
    assert seen_BV.shape == logits_BV.shape
    assert counts_BV.shape == logits_BV.shape
    assert counts_BV.dtype == jnp.int32
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = when(flags.bias, lambda x: apply_logit_bias(x, params.bias_ids_BE, params.bias_BE), logits_BV)
    logits_BV = when(flags.hold_end, lambda x: hold_end_tokens(x, counts_BV, params.min_tokens_B, params.end_ids_BU), logits_BV)
    logits_BV = when(flags.penalize, lambda x: apply_repetition_penalty(x, seen_BV, params.repetition_penalty_B), logits_BV)
    logits_BV = when(
        flags.count_penalty,
        lambda x: apply_count_penalties(x, counts_BV, params.frequency_penalty_B, params.presence_penalty_B), logits_BV,
    )  # fmt: skip

    def warped(x_BV: jax.Array) -> jax.Array:
        return jnp.where(params.temperature_B[:, None] > 0, warp_for_sampling(x_BV, params, flags), x_BV)

    return when(flags.sample, warped, logits_BV)


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """Each row's first index of its maximum, as jnp.argmax gives it (a NaN counts as the maximum),
    by two plain reductions: XLA on CPU reduces argmax's (value, index) pairs element by element,
    measured here twice as slow (8 x 50257 float32 logits: 2.07 ms against 0.98 ms, ~4% of a batch-8
    gpt2 decode step)."""
    assert x_BV.ndim == 2
    assert jnp.issubdtype(x_BV.dtype, jnp.floating)
    max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)  # NaN if the row holds one
    index_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    at_max_BV = (x_BV == max_B1) | jnp.isnan(x_BV)
    first_B = jnp.min(jnp.where(at_max_BV, index_BV, x_BV.shape[-1]), axis=-1)
    assert first_B.shape == x_BV.shape[:1]
    return first_B


# A draw takes a block of DRAW_BLOCK tokens by its share of the probability, then a token of that
# block by its share of the block: two uniforms and a few passes over the row. Gumbel-max
# (jax.random.categorical) makes one random number per token instead: 2.4 ms for one 50257-wide row
# and 6.2 ms for eight on the 2-core Zen 4 host, against ~0.1 and ~0.5 ms this way.
DRAW_BLOCK = 256


def draw_index(weights_BX: jax.Array, uniform_B: jax.Array) -> jax.Array:
    """Each row's index i drawn with probability weights[i] / sum(weights) (weights >= 0, some > 0): the
    first index whose running sum passes uniform * total. A zero weight is never drawn: not where its
    running sum equals the one before it, nor where rounding puts the target at the total."""
    B, X = weights_BX.shape
    assert uniform_B.shape == (B,)
    running_BX = jnp.cumsum(weights_BX, axis=-1)
    target_B1 = uniform_B[:, None] * running_BX[:, -1:]
    index_B = jnp.sum(running_BX <= target_B1, axis=-1, dtype=jnp.int32)
    last_B = jnp.max(jnp.where(weights_BX > 0, jax.lax.broadcasted_iota(jnp.int32, (B, X), 1), 0), axis=-1)
    assert index_B.shape == (B,)
    return jnp.minimum(index_B, last_B)


def draw_tokens(keys_B2: jax.Array, logits_BV: jax.Array) -> jax.Array:
    """One token per row, drawn from softmax(logits) (-inf: never), with each row's own key."""
    B, V = logits_BV.shape
    assert keys_B2.shape == (B, 2)
    G = -(-V // DRAW_BLOCK)
    padded_BV = jnp.pad(logits_BV.astype(jnp.float32), ((0, 0), (0, G * DRAW_BLOCK - V)), constant_values=-jnp.inf)
    weights_BGX = jnp.exp(padded_BV - jnp.max(padded_BV, axis=-1, keepdims=True)).reshape(B, G, DRAW_BLOCK)
    uniforms_B2 = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys_B2)
    block_B = draw_index(jnp.sum(weights_BGX, axis=-1), uniforms_B2[:, 0])
    in_block_BX = jnp.take_along_axis(weights_BGX, block_B[:, None, None], axis=1)[:, 0]
    token_B = block_B * DRAW_BLOCK + draw_index(in_block_BX, uniforms_B2[:, 1])
    assert token_B.shape == (B,)
    return token_B


def choose_tokens(picked_BV: jax.Array, params: SamplingParams, keys_B2: jax.Array, flags: SamplerFlags) -> jax.Array:
    """One token per row from `pick_logits`' output: argmax for greedy rows, a draw for sampling rows."""
    assert picked_BV.ndim == 2
    assert keys_B2.shape[0] == picked_BV.shape[0]
    greedy_B = first_argmax(picked_BV)

    def sampled(greedy_B: jax.Array) -> jax.Array:
        drawn_B = draw_tokens(keys_B2, picked_BV)
        return jnp.where(params.temperature_B > 0, drawn_B, greedy_B)

    tokens_B = when(flags.sample, sampled, greedy_B)
    assert tokens_B.shape == picked_BV.shape[:1]
    return tokens_B


def token_logprobs(
    logits_BV: jax.Array, token_B: jax.Array, num_top: int, use_kernel: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax(logits) at each row's token, and its num_top best entries (ids, values; best first).

    Each value is its logit minus the row's one log-sum-exp (both by the kernel where use_kernel), so a
    token that is the best has exactly its top value (evaluation harnesses compare them with == to
    call a continuation greedy). Subtracting one number keeps the order, so the best logits are the
    best log-probabilities, and no (B, V) log-softmax array is made.
    """
    assert logits_BV.ndim == 2
    assert token_B.shape == logits_BV.shape[:1]
    logits_BV = logits_BV.astype(jnp.float32)
    lse_B, top_ids_BA, top_logits_BA = logsumexp_top_rows(logits_BV, num_top, use_kernel)
    logprob_B = jnp.take_along_axis(logits_BV, token_B[:, None].astype(jnp.int32), axis=-1)[:, 0] - lse_B
    return logprob_B, top_ids_BA, top_logits_BA - lse_B[:, None]


def next_tokens(
    logits_BV: jax.Array, seen_BV: jax.Array, counts_BV: jax.Array, params: SamplingParams, keys_B2: jax.Array,
    flags: SamplerFlags,
) -> jax.Array:  # fmt: skip
    """One token per row: argmax for greedy rows, a draw from the warped softmax for sampling rows."""
    assert logits_BV.ndim == 2
    assert keys_B2.shape[0] == logits_BV.shape[0]
    return choose_tokens(pick_logits(logits_BV, seen_BV, counts_BV, params, flags), params, keys_B2, flags)
