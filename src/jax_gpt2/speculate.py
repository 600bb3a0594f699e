"""Speculative decoding, exact: guess a few tokens cheaply, score them all in one forward pass over
the cache, keep the longest prefix the model agrees with.

A decode step streams every weight once to make one token per row; a verify pass streams them
once for T = 1 + k query positions (the block-causal attention of the cached forward scores all of
them), so each accepted guess is a token for the price of a little arithmetic. One iteration:

    t0 <- pick from the row's logits (the model's own next token: always kept)
    draft d1..dk <- prompt lookup: what followed the latest earlier occurrence of the last n tokens
    verify: [t0, d1..dk] through the model at the row's cache end -> logits at T = k + 1 positions
    accept d_i while the model agrees (greedy: its pick equals d_i; sampled: with probability
           min(1, p(d_i) / q(d_i)), q one-hot for a lookup, so p(d_i)) -> m accepted
    emit t0, d1..dm; the row's cache end moves by 1 + m (the rejected slots are overwritten later);
           its next logits are the ones at position m

A rejected sampled draft leaves q behind (`residual_q_BV`): the next token is drawn from the
normalized max(0, p - q) (Leviathan et al. 2023), so every emitted token follows exactly the
distribution plain sampling gives, after every processor of sampling.py's chain (`pick_logits`),
which this module calls rather than copies. Greedy rows take `first_argmax` of the same chain, so
their tokens equal plain decoding's.

Rows of a batch accept different counts; each row keeps its own cache end (kvcache.py's end_B).
How many tokens to draft is chosen each iteration (`choose_width`) from the rows' recent acceptance
and a cost model of a verify pass, down to none (a plain decode step), so text that never repeats
costs about what plain decoding costs. The whole loop is one `lax.while_loop`: no host round trip.

Shape key as in model.py; here T counts a verify pass's positions (1 + draft tokens) and K the
output slots of a call.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jax_gpt2.config import GPT2Config
from jax_gpt2.model import lm_logits, transformer, transformer_from_empty
from jax_gpt2.sampling import SamplerFlags, SamplingParams, draw_tokens, first_argmax, pick_logits
from jax_gpt2.weights import GPT2Weights

# A new row's evidence: it believes half its guesses will be accepted. The prior is where the
# evidence starts, so it decays like any evidence: had it been added to the decayed counts at every
# choice, a row whose guesses all fail would settle at rate 1 / (2 + 1 / (1 - FORGET)) = 1/7 and
# keep paying for width-1 passes forever (measured: 0.86x plain on text the lookups find and the
# model never copies).
PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0
FORGET = 0.8  # each verified guess weighs the older evidence down by this much
MAX_RATE = 0.99  # keeps the expected-length series finite


# What a verify pass of T = 1 + k positions costs against a plain decode step of the same rows, by the
# weights' dtype and the batch: PASS_COSTS[dtype][batch][T - 1], T = 1..8. Measured in the decode
# loop's own conditions (eight passes in one loop, the cache updated in place, greedy acceptance
# included; the best of five calls) on the 2-core Zen 4 host, AVX-512 kernels, gpt2 shape, cache at
# 128 positions, on 2026-12-06 after verify passes took the kernels' attention (float32: the mean of
# two runs, batches 1-4, as the host's memory bandwidth wandered between them, 33 to 54 GB/s), by the
# method of tools/bench_speculate.verify_costs, whose medians `jax-gpt2 bench --speculate lookup`
# prints as "pass costs" rows. Rows, not positions, set the price: a register block holds 6 rows, and
# past that every block reads the weights again (from L2 when float32; bf16 and int8 also widen them
# again, and bound by arithmetic from ~8 rows, each row costs about as much as a whole step at batch 1).
# So a batch of 8 pays 1.4x (float32) or 1.7-1.8x (bf16, int8) for one draft token where batch 1
# pays 1.02-1.11x. Another host can measure its own and pass it as PromptLookup(pass_costs=...).
PASS_COSTS = {
    "float32": (
        (1, (1.00, 1.02, 1.05, 1.08, 1.15, 1.18, 1.31, 1.35)),
        (2, (1.00, 1.06, 1.17, 1.38, 1.59, 1.68, 1.92, 2.15)),
        (4, (1.00, 1.29, 1.59, 2.00, 2.32, 2.62, 3.04, 3.40)),
        (8, (1.00, 1.43, 1.87, 2.38, 2.90, 3.46, 3.96, 4.72)),
        (16, (1.00, 1.71, 2.48, 3.28, 3.99, 4.63, 5.82, 6.26)),
    ),
    "bfloat16": (
        (1, (1.00, 1.02, 1.04, 1.08, 1.10, 1.19, 1.36, 1.49)),
        (2, (1.00, 1.05, 1.24, 1.48, 1.76, 2.05, 2.34, 2.63)),
        (4, (1.00, 1.38, 1.90, 2.44, 2.99, 3.51, 4.06, 4.62)),
        (8, (1.00, 1.71, 2.42, 3.50, 3.84, 5.27, 6.17, 7.26)),
        (16, (1.00, 1.76, 2.62, 3.56, 4.36, 5.22, 6.08, 6.89)),
    ),
    "int8": (
        (1, (1.00, 1.11, 1.18, 1.45, 1.61, 1.91, 2.40, 2.57)),
        (2, (1.00, 1.47, 1.90, 2.56, 3.00, 3.50, 4.12, 4.58)),
        (4, (1.00, 1.85, 2.44, 3.23, 4.07, 4.68, 5.40, 6.18)),
        (8, (1.00, 1.79, 2.37, 3.25, 3.98, 5.13, 5.69, 7.10)),
        (16, (1.00, 1.79, 2.72, 3.49, 4.31, 5.28, 6.01, 6.79)),
    ),
}


def width_costs(table, batch: int, widths: tuple[int, ...]) -> tuple[float, ...]:
    """The cost (in plain decode steps) of a verify pass of each width for `batch` rows, from a table
    of PASS_COSTS' form: the row of the smallest batch >= `batch` (the largest past the table), each
    width's entry, and past the last entry its slope continued."""
    assert batch >= 1
    assert all(width >= 0 for width in widths)
    batches = [size for size, _ in table]
    costs = next((row for size, row in table if size >= batch), table[-1][1])
    assert batches == sorted(batches)
    slope = costs[-1] - costs[-2]
    return tuple(costs[w] if w < len(costs) else costs[-1] + slope * (w + 1 - len(costs)) for w in widths)


def prior_evidence(rows: int) -> tuple[jax.Array, jax.Array]:
    """hits_B, trials_B of rows that have verified nothing yet: the prior, which then decays like any
    evidence (`decayed_evidence`)."""
    assert rows >= 1
    hits_B, trials_B = jnp.full((rows,), PRIOR_HITS, jnp.float32), jnp.full((rows,), PRIOR_TRIALS, jnp.float32)
    assert hits_B.shape == trials_B.shape
    return hits_B, trials_B


def _static(default):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Draft tokens by prompt lookup (n-gram speculation): the continuation of the latest earlier
    occurrence of the last n tokens (n from max_ngram down to min_ngram) in prompt + output.

    max_draft: draft tokens per verify pass at most (k; on the 2-core AVX-512 host a float32 pass
    of up to 6 positions costs ~1.2 decode steps at batch 1, 7 or 8 ~1.3). adaptive: choose each
    pass's width from the rows' recent acceptance and the cost of a pass (False: draft max_draft
    whenever a lookup hits, for tests and measurements). pass_costs: a table of PASS_COSTS' form for
    this host (None: PASS_COSTS' for the weights' dtype).
    """

    max_draft: int = _static(5)
    max_ngram: int = _static(3)
    min_ngram: int = _static(1)
    adaptive: bool = _static(True)
    pass_costs: tuple | None = _static(None)

    def __post_init__(self) -> None:
        if not isinstance(self.max_draft, int) or not 1 <= self.max_draft <= 32:
            raise ValueError(f"max_draft must be an integer in [1, 32]; got {self.max_draft!r}")
        if not isinstance(self.min_ngram, int) or self.min_ngram < 1:
            raise ValueError(f"min_ngram must be an integer >= 1; got {self.min_ngram!r}")
        if not isinstance(self.max_ngram, int) or not self.min_ngram <= self.max_ngram <= 8:
            raise ValueError(f"max_ngram must be an integer in [min_ngram, 8]; got {self.max_ngram!r}")
        if self.pass_costs is not None:
            check_pass_costs(self.pass_costs)

    @property
    def widths(self) -> tuple[int, ...]:
        return draft_widths(self.max_draft, self.adaptive)

    def costs(self, weight_dtype, batch: int) -> tuple[float, ...]:
        """The cost in plain decode steps of a pass of each of `widths` over `batch` rows."""
        return table_costs(self.pass_costs, weight_dtype, batch, self.widths)


def draft_widths(max_draft: int, adaptive: bool) -> tuple[int, ...]:
    """The draft widths compiled (one verify pass each): 0 (a plain step), powers of two, max_draft;
    not adaptive, 0 and max_draft only."""
    assert max_draft >= 1
    if not adaptive:
        return (0, max_draft)
    powers = [2**i for i in range(int(math.log2(max_draft)) + 1)]
    widths = tuple(sorted({0, *powers, max_draft}))
    assert widths[0] == 0
    return widths


def table_costs(pass_costs, weight_dtype, batch: int, widths: tuple[int, ...]) -> tuple[float, ...]:
    """The cost in plain decode steps of a verify pass of each width over `batch` rows, from a host's
    own table (pass_costs) or else PASS_COSTS' for the weights' dtype."""
    table = pass_costs or PASS_COSTS.get(jnp.dtype(weight_dtype).name, PASS_COSTS["float32"])
    costs = width_costs(table, batch, widths)
    assert len(costs) == len(widths)
    assert costs[0] > 0
    return costs


def check_pass_costs(table) -> None:
    """A pass-cost table is ((batch, (cost at T = 1, 2, ...)), ...): batches rising, costs positive, T = 1 costs 1."""
    if not isinstance(table, tuple) or not table or not all(isinstance(row, tuple) and len(row) == 2 for row in table):
        raise ValueError("pass_costs must be a tuple of (batch, costs) pairs")
    batches = [batch for batch, _ in table]
    if batches != sorted(set(batches)) or batches[0] < 1:
        raise ValueError(f"pass_costs' batches must rise from 1 or more; got {batches}")
    for batch, costs in table:
        if not isinstance(costs, tuple) or len(costs) < 2 or costs[0] != 1.0 or min(costs) <= 0:
            raise ValueError(f"pass_costs at batch {batch}: 2 or more positive costs from 1.0 (T = 1); got {costs!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Draft tokens with a smaller model of the same vocabulary (distilgpt2 for gpt2, gpt2 for
    gpt2-xl): it keeps its own KV cache and runs one step per draft token. Its tokens follow its own
    distribution q after the same sampling processors; acceptance min(1, p/q) keeps the output exact.

    adaptive: choose each pass's width (0, powers of two, max_draft) from the rows' recent acceptance
    and the price of a pass: its verify pass (PASS_COSTS) plus one draft step per draft token (False:
    max_draft every pass). step_cost: a draft step's price in the model's decode steps (None: the
    draft's weight bytes over the model's, since a decode step at small batches reads every weight
    once). A row's draft cache is fed only while its batch drafts: drafts that keep failing end the
    drafting, and if its batch drafts again later its drafts come from a cache with gaps (still
    exact, since every draft is verified; rarely accepted).
    """

    weights: GPT2Weights
    config: GPT2Config = _static(None)
    max_draft: int = _static(4)
    adaptive: bool = _static(True)
    step_cost: float | None = _static(None)
    pass_costs: tuple | None = _static(None)

    def __post_init__(self) -> None:
        if not isinstance(self.config, GPT2Config):
            raise ValueError(f"DraftModel needs the draft's GPT2Config; got {type(self.config).__name__}")
        if not isinstance(self.weights, GPT2Weights):
            raise ValueError(f"DraftModel needs the draft's GPT2Weights; got {type(self.weights).__name__}")
        if not isinstance(self.max_draft, int) or not 1 <= self.max_draft <= 32:
            raise ValueError(f"max_draft must be an integer in [1, 32]; got {self.max_draft!r}")
        if self.step_cost is not None and not (isinstance(self.step_cost, (int, float)) and self.step_cost > 0):
            raise ValueError(f"step_cost must be a positive number of decode steps (or None); got {self.step_cost!r}")
        if self.pass_costs is not None:
            check_pass_costs(self.pass_costs)

    @property
    def widths(self) -> tuple[int, ...]:
        return draft_widths(self.max_draft, self.adaptive)

    def costs(self, weight_dtype, batch: int) -> tuple[float, ...]:
        """The cost in plain decode steps of each of `widths`' verify passes (without the draft's
        own steps: `pass_prices` adds them, knowing the model they are priced against)."""
        return table_costs(self.pass_costs, weight_dtype, batch, self.widths)


def step_bytes(weights: GPT2Weights) -> int:
    """The weight bytes a decode step at a small batch reads: every block's parameters and the output
    projection (of the embedding, only the batch's rows)."""
    if weights.lm_head_DV is not None:
        head = weights.lm_head_DV
    else:
        head = weights.wte_VD if weights.lm_head_VD is None else weights.lm_head_VD
    leaves = jax.tree.leaves((weights.blocks, head))
    total = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    assert total > 0
    return int(total)


def pass_prices(drafter, weights: GPT2Weights, batch: int) -> tuple[float, ...]:
    """What an iteration of each of the drafter's widths costs in plain decode steps: its verify pass,
    and for a DraftModel one draft step per draft token on top."""
    assert batch >= 1
    costs = drafter.costs(weights.blocks[0].qkv_w_DE.dtype, batch)
    if isinstance(drafter, DraftModel):
        step = drafter.step_cost or step_bytes(drafter.weights) / step_bytes(weights)
        costs = tuple(cost + width * step for cost, width in zip(costs, drafter.widths))
    assert len(costs) == len(drafter.widths)
    return costs


def check_draft_vocabulary(speculate, config: GPT2Config) -> None:
    """A draft model must share the target's vocabulary: its token ids are the target's."""
    if isinstance(speculate, DraftModel) and speculate.config.vocab_size != config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({speculate.config.vocab_size} tokens) differs from the model's "
            f"({config.vocab_size}): a draft must share the tokenizer"
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeState:
    decode: Any  # generate.DecodeState: cache, raw next-token logits, seen, done, keys, step
    history_BS: jax.Array  # int32: the token in each cache slot; slot end_B holds the row's newest token
    residual_q_BV: jax.Array  # float32: q of the row's last rejected draft token (zeros: none)
    residual_B: jax.Array  # bool: the last pass left a residual q (where not, residual_q_BV is unread)
    count_B: jax.Array  # int32: tokens emitted so far
    hits_B: jax.Array  # float32: recent accepted guesses (decayed by FORGET)
    trials_B: jax.Array  # float32: recent verified guesses (decayed by FORGET)
    guess_B: jax.Array  # int32: a lookup's first guess that was not verified (-1: none), checked for free
    drafted_B: jax.Array  # int32: draft tokens verified
    accepted_B: jax.Array  # int32: draft tokens accepted
    passes_B: jax.Array  # int32: verify passes with at least one draft token
    draft_cache: Any = None  # a DraftModel's KVCache (slots as the model's), None for a lookup


def start_speculating(state, ids_BT: jax.Array, speculate=None) -> SpeculativeState:
    """The speculative state after a prefill of the left-padded prompts ids_BT (`generate.prefill`);
    a DraftModel gets its own cache of the same slots, holding the prompt."""
    B, T = ids_BT.shape
    S, V = state.cache.max_len, state.logits_BV.shape[1]
    assert state.done_B.shape == (B,)
    assert S >= T
    history_BS = jnp.zeros((B, S), jnp.int32).at[:, :T].set(ids_BT.astype(jnp.int32))
    zeros_B = jnp.zeros((B,), jnp.int32)
    hits_B, trials_B = prior_evidence(B)
    spec = SpeculativeState(
        decode=state, history_BS=history_BS, residual_q_BV=jnp.zeros((B, V), jnp.float32),
        residual_B=jnp.zeros((B,), jnp.bool_), count_B=zeros_B,
        hits_B=hits_B, trials_B=trials_B, guess_B=zeros_B - 1,
        drafted_B=zeros_B, accepted_B=zeros_B, passes_B=zeros_B, draft_cache=draft_prefill(ids_BT, state, speculate),
    )  # fmt: skip
    assert spec.history_BS.shape == (B, S)
    return spec


def draft_prefill(ids_BT: jax.Array, state, speculate) -> Any:
    """A DraftModel's cache after the prompts (None for anything else)."""
    if not isinstance(speculate, DraftModel):
        return None
    cache = state.cache
    kv_dtype = cache.kv_dtype
    _, draft_cache = transformer_from_empty(ids_BT, cache.start_B, cache.max_len, speculate.weights, speculate.config,
                                            kv_dtype)  # fmt: skip
    assert draft_cache.max_len == cache.max_len
    return draft_cache


def run_draft_model(
    state: SpeculativeState, token_B: jax.Array, speculate: DraftModel, k: int, params: SamplingParams,
    flags: SamplerFlags, keys_B2: jax.Array,
) -> tuple[jax.Array, jax.Array, Any]:  # fmt: skip
    """k (static, >= 1) tokens of the draft model after each row's t0, their distributions q_BTV
    (position t holds q of draft token t + 1; the last position zeros) and the draft cache.

    The first step runs the row's previous token and t0 together: the previous one is missing from
    the draft cache when the last pass accepted every draft (the draft never ran its own last
    token), and rewriting it otherwise stores the same keys again.
    """
    B = token_B.shape[0]
    assert 1 <= k <= speculate.max_draft
    end_B = state.decode.cache.end_B
    weights, config = speculate.weights, speculate.config
    previous_B = jnp.take_along_axis(state.history_BS, (end_B - 1)[:, None], axis=1)[:, 0]
    cache = dataclasses.replace(state.draft_cache, end_B=end_B - 1)
    hidden_BTD, cache = transformer(jnp.stack([previous_B, token_B], axis=1), cache, weights, config)
    logits_BV = lm_logits(hidden_BTD[:, 1:], weights)[:, 0]
    seen_BV = state.decode.seen_BV | jax.nn.one_hot(token_B, logits_BV.shape[1], dtype=jnp.bool_)
    counts_BV = state.decode.counts_BV + jax.nn.one_hot(token_B, logits_BV.shape[1], dtype=jnp.int32)

    def draw(logits_BV, seen_BV, counts_BV, i):
        picked_BV = pick_logits(logits_BV, seen_BV, counts_BV, params, flags)
        draft_B = first_argmax(picked_BV)
        q_BV = jax.nn.softmax(picked_BV, axis=-1)
        if flags.sample is not False:
            keys_i_B2 = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B2, 100 + i)
            drawn_B = draw_tokens(keys_i_B2, picked_BV)
            draft_B = jnp.where(params.temperature_B > 0, drawn_B, draft_B)
        return draft_B, q_BV

    def step(carry, i):
        cache, logits_BV, seen_BV, counts_BV = carry
        draft_B, q_BV = draw(logits_BV, seen_BV, counts_BV, i)
        hidden_BTD, cache = transformer(draft_B[:, None], cache, weights, config)
        seen_BV = seen_BV | jax.nn.one_hot(draft_B, seen_BV.shape[1], dtype=jnp.bool_)
        counts_BV = counts_BV + jax.nn.one_hot(draft_B, counts_BV.shape[1], dtype=jnp.int32)
        return (cache, lm_logits(hidden_BTD, weights)[:, 0], seen_BV, counts_BV), (draft_B, q_BV)

    carry = (cache, logits_BV, seen_BV, counts_BV)
    (cache, logits_BV, seen_BV, counts_BV), (drafts_YB, q_YBV) = jax.lax.scan(step, carry, jnp.arange(k - 1))
    last_B, last_q_BV = draw(logits_BV, seen_BV, counts_BV, k - 1)
    draft_BT = jnp.concatenate([drafts_YB.T, last_B[:, None]], axis=1)
    q_BTV = jnp.concatenate([q_YBV.transpose(1, 0, 2), last_q_BV[:, None], jnp.zeros_like(last_q_BV)[:, None]], axis=1)
    assert draft_BT.shape == (B, k)
    assert q_BTV.shape == (B, k + 1, logits_BV.shape[1])
    return draft_BT, q_BTV, cache


def lookup_draft(
    history_BS: jax.Array, start_B: jax.Array, end_B: jax.Array, lookup: PromptLookup
) -> tuple[jax.Array, jax.Array]:
    """Each row's draft of lookup.max_draft tokens and whether its lookup hit.

    A row's text is history_BS[start_B : end_B + 1]. Its draft is what followed the latest earlier
    occurrence of its last n tokens (the longest n that occurs). Where that continuation reaches the
    end of the text it goes on with the draft itself (period end - j), so a loop drafts full length.
    """
    B, S = history_BS.shape
    assert start_B.shape == (B,)
    assert end_B.shape == (B,)
    slots_S = jnp.arange(S, dtype=jnp.int32)
    found_B = jnp.zeros((B,), jnp.bool_)
    match_end_B = jnp.full((B,), -1, jnp.int32)
    for n in range(lookup.max_ngram, lookup.min_ngram - 1, -1):
        match_BS = (slots_S[None, :] - n + 1 >= start_B[:, None]) & (slots_S[None, :] < end_B[:, None])
        match_BS &= (end_B - n + 1 >= start_B)[:, None]
        for back in range(n):
            last_B = jnp.take_along_axis(history_BS, jnp.maximum(end_B - back, 0)[:, None], axis=1)[:, 0]
            shifted_BS = jnp.roll(history_BS, back, axis=1)  # shifted[s] = history[s - back]
            match_BS &= shifted_BS == last_B[:, None]
        latest_B = jnp.max(jnp.where(match_BS, slots_S[None, :], -1), axis=1)
        match_end_B = jnp.where(found_B, match_end_B, latest_B)
        found_B |= latest_B >= 0
    period_B = jnp.maximum(end_B - match_end_B, 1)
    steps_T = jnp.arange(lookup.max_draft, dtype=jnp.int32)
    slots_BT = match_end_B[:, None] + 1 + steps_T[None, :] % period_B[:, None]
    draft_BT = jnp.take_along_axis(history_BS, jnp.clip(slots_BT, 0, S - 1), axis=1)
    assert draft_BT.shape == (B, lookup.max_draft)
    return draft_BT, found_B


ACCEPT_KEY = 1  # a row's acceptance key is fold_in(its step key, ACCEPT_KEY): apart from every pick's key


def step_keys(state: SpeculativeState) -> jax.Array:
    """Each row's key of this iteration, which picks t0: one threefry a row, as a plain decode step
    takes (on a CPU each is a small loop of its own, so an iteration that drafts nothing derives no more)."""
    keys_B2 = jax.vmap(jax.random.fold_in)(state.decode.keys_B2, state.decode.step_B)
    assert keys_B2.shape == state.decode.keys_B2.shape
    assert keys_B2.dtype == state.decode.keys_B2.dtype
    return keys_B2


def accept_keys(step_keys_B2: jax.Array) -> jax.Array:
    """The keys that draft and accept a pass's tokens, derived only by passes that verify a draft."""
    keys_B2 = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys_B2, ACCEPT_KEY)
    assert keys_B2.shape == step_keys_B2.shape
    return keys_B2


def pick_first(state: SpeculativeState, params: SamplingParams, flags: SamplerFlags, keys_B2) -> jax.Array:
    """t0 of each row from its logits through sampling.py's chain: greedy rows take first_argmax; a
    sampling row draws from the normalized max(0, p - q), q its last rejected draft (zeros: p)."""
    B = state.count_B.shape[0]
    picked_BV = pick_logits(state.decode.logits_BV, state.decode.seen_BV, state.decode.counts_BV, params, flags)
    greedy_B = first_argmax(picked_BV)
    if flags.sample is False:
        return greedy_B

    def from_residual() -> jax.Array:
        q_BV = jnp.where(state.residual_B[:, None], state.residual_q_BV, 0.0)
        residual_BV = jnp.maximum(jax.nn.softmax(picked_BV, axis=-1) - q_BV, 0.0)
        empty_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True) <= 0  # p == q: nothing was rejected
        return draw_tokens(keys_B2, jnp.where(empty_B1, picked_BV, jnp.log(residual_BV)))

    def drawn(greedy_B: jax.Array) -> jax.Array:
        # Passes that rejected nothing (every plain step among them) draw as plain sampling does,
        # without the residual's passes over each row's vocabulary.
        drawn_B = jax.lax.cond(jnp.any(state.residual_B), from_residual, lambda: draw_tokens(keys_B2, picked_BV))
        return jnp.where(params.temperature_B > 0, drawn_B, greedy_B)

    token_B = drawn(greedy_B) if flags.sample is True else jax.lax.cond(flags.sample, drawn, lambda g: g, greedy_B)
    assert token_B.shape == (B,)
    return token_B


def picked_at_positions(
    logits_BTV: jax.Array, ids_BT: jax.Array, seen_BV: jax.Array, counts_BV: jax.Array, params: SamplingParams,
    flags: SamplerFlags,
) -> jax.Array:  # fmt: skip
    """pick_logits at every verify position: position t has seen the row's tokens and ids_BT[:, :t + 1],
    and counts ids_BT[:, :t + 1] among the row's output (they are all generated tokens)."""
    B, T, V = logits_BTV.shape
    assert ids_BT.shape == (B, T)
    assert seen_BV.shape == (B, V)
    assert counts_BV.shape == (B, V)
    new_BTV = jax.nn.one_hot(ids_BT, V, dtype=jnp.int32)
    seen_BTV = seen_BV[:, None, :] | (jax.lax.cummax(new_BTV, axis=1) > 0)
    counts_BTV = counts_BV[:, None, :] + jnp.cumsum(new_BTV, axis=1, dtype=jnp.int32)
    rows_params = jax.tree.map(lambda x: jnp.repeat(x, T, axis=0), params)
    picked_MV = pick_logits(
        logits_BTV.reshape(B * T, V), seen_BTV.reshape(B * T, V), counts_BTV.reshape(B * T, V), rows_params, flags
    )  # fmt: skip
    assert picked_MV.shape == (B * T, V)
    return picked_MV.reshape(B, T, V)


def accept_drafts(
    logits_BTV: jax.Array, ids_BT: jax.Array, draft_len_B: jax.Array, seen_BV: jax.Array, counts_BV: jax.Array,
    params: SamplingParams, flags: SamplerFlags, keys_B2: jax.Array, q_BTV: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """How many of each row's draft tokens ids_BT[:, 1 : 1 + draft_len_B] the model accepts, and the
    q it leaves behind (the draft's distribution at the first rejected token; zeros if none was).

    Position t's logits score ids_BT[:, t + 1], drawn from q_BTV[:, t] (None: a lookup, q one-hot).
    Greedy: accepted while the chain's first_argmax equals the draft. Sampled: accepted with
    probability min(1, p(draft) / q(draft)).
    """
    B, T, V = logits_BTV.shape
    assert draft_len_B.shape == (B,)
    assert T >= 2
    picked_BTV = picked_at_positions(logits_BTV, ids_BT, seen_BV, counts_BV, params, flags)
    target_BT = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, :1]], axis=1)  # the last column is never a draft
    agrees_BT = first_argmax(picked_BTV.reshape(B * T, V)).reshape(B, T) == target_BT
    if flags.sample is not False:
        probs_BTV = jax.nn.softmax(picked_BTV, axis=-1)
        p_BT = jnp.take_along_axis(probs_BTV, target_BT[..., None], axis=-1)[..., 0]
        if q_BTV is not None:
            q_BT = jnp.take_along_axis(q_BTV, target_BT[..., None], axis=-1)[..., 0]
            p_BT = p_BT / jnp.maximum(q_BT, jnp.finfo(jnp.float32).tiny)
        uniform_BT = jax.vmap(lambda key: jax.random.uniform(key, (T,)))(keys_B2)
        agrees_BT = jnp.where(params.temperature_B[:, None] > 0, uniform_BT < p_BT, agrees_BT)
    in_draft_BT = jnp.arange(T)[None, :] < draft_len_B[:, None]
    accepted_B = jnp.sum(jnp.cumprod(agrees_BT & in_draft_BT, axis=1), axis=1).astype(jnp.int32)
    rejected_B = accepted_B < draft_len_B
    at_B = jnp.minimum(accepted_B, T - 1)
    if q_BTV is None:
        rejected_token_B = jnp.take_along_axis(target_BT, at_B[:, None], axis=1)[:, 0]
        q_rejected_BV = jax.nn.one_hot(rejected_token_B, V, dtype=jnp.float32)
    else:
        q_rejected_BV = jnp.take_along_axis(q_BTV, at_B[:, None, None], axis=1)[:, 0]
    residual_q_BV = q_rejected_BV * rejected_B[:, None]
    assert accepted_B.shape == (B,)
    return accepted_B, residual_q_BV


def verify(
    ids_BT: jax.Array, draft_len_B: jax.Array, state: SpeculativeState, params: SamplingParams,
    flags: SamplerFlags, keys_B2: jax.Array, weights: GPT2Weights, config: GPT2Config, q_BTV: jax.Array | None = None,
) -> tuple[Any, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """One forward pass of [t0, drafts] at each row's cache end. Returns the cache (its end_B not yet
    moved), accepted_B, the raw logits after the last kept token, and the residual q."""
    B, T = ids_BT.shape
    assert draft_len_B.shape == (B,)
    hidden_BTD, cache = transformer(ids_BT, state.decode.cache, weights, config)
    logits_BTV = lm_logits(hidden_BTD, weights)
    if T == 1:  # a plain decode step: nothing to accept
        return cache, jnp.zeros((B,), jnp.int32), logits_BTV[:, 0], jnp.zeros_like(state.residual_q_BV)
    accepted_B, residual_q_BV = accept_drafts(
        logits_BTV, ids_BT, draft_len_B, state.decode.seen_BV, state.decode.counts_BV, params, flags, keys_B2, q_BTV
    )
    next_logits_BV = jnp.take_along_axis(logits_BTV, accepted_B[:, None, None], axis=1)[:, 0]
    assert next_logits_BV.shape == (B, logits_BTV.shape[2])
    return cache, accepted_B, next_logits_BV, residual_q_BV


def expected_tokens(rate_B: jax.Array, draft_len_B: jax.Array) -> jax.Array:
    """Tokens a verify pass emits on average when each guess is accepted with probability rate:
    1 + rate + ... + rate^draft_len (t0 always, then each draft token while all before it held)."""
    assert rate_B.shape == draft_len_B.shape
    rate_B = jnp.clip(rate_B, 0.0, MAX_RATE)
    return (1.0 - rate_B ** (draft_len_B + 1).astype(jnp.float32)) / (1.0 - rate_B)


def choose_width(
    hits_B: jax.Array, trials_B: jax.Array, can_draft_B: jax.Array, limit_B: jax.Array, active_B: jax.Array,
    lookup: PromptLookup, costs: tuple[float, ...], remaining_B: jax.Array | None = None,
) -> jax.Array:
    """Index into lookup.widths of this iteration's draft width (costs: each width's, in plain steps),
    or for a fixed lookup the widest any row can use. Ties go to the narrower.

    remaining_B None (a server, whose finished rows make room for new ones): the width that makes the
    most tokens per unit of cost over all rows. remaining_B given (a batch that returns when its last
    row is done): the width that finishes soonest, judged by the row that would take longest, its
    remaining tokens over its expected tokens a pass, times the cost. A row that never copies then keeps
    the whole batch at plain steps, since no width makes it faster.
    """
    B = can_draft_B.shape[0]
    assert limit_B.shape == (B,)
    assert len(costs) == len(lookup.widths)
    widths = lookup.widths
    usable_B = jnp.where(can_draft_B & active_B, limit_B, 0)
    if not lookup.adaptive:
        return jnp.where(jnp.any(usable_B > 0), len(widths) - 1, 0).astype(jnp.int32)
    rate_B = hits_B / jnp.maximum(trials_B, 1.0)  # trials start at PRIOR_TRIALS; a decay comes with >= 1 new
    scores = []
    for width, cost in zip(widths, costs):
        tokens_B = expected_tokens(rate_B, jnp.minimum(usable_B, width))
        if remaining_B is None:
            scores.append(jnp.sum(jnp.where(active_B, tokens_B, 0.0)) / cost)
        else:
            passes_B = jnp.where(active_B, remaining_B / tokens_B, 0.0)
            scores.append(-jnp.max(passes_B) * cost)
    index = jnp.argmax(jnp.stack(scores)).astype(jnp.int32)  # the first best: the narrowest
    assert index.shape == ()
    return index


def emitted_lengths(ids_BT: jax.Array, kept_B: jax.Array, end_BU: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How many of ids_BT[:, :kept_B] each row emits (through its first end token), and whether one hit.
    end_BU: each row's end tokens (padded with -1), or one row (1, U) that every row shares."""
    B, T = ids_BT.shape
    assert kept_B.shape == (B,)
    assert end_BU.ndim == 2
    is_end_BT = jnp.any(ids_BT[:, :, None] == end_BU[:, None, :], axis=-1)
    is_eos_BT = is_end_BT & (jnp.arange(T)[None, :] < kept_B[:, None])
    first_eos_B = jnp.min(jnp.where(is_eos_BT, jnp.arange(T)[None, :], T), axis=1)
    hit_B = first_eos_B < T
    emitted_B = jnp.where(hit_B, first_eos_B + 1, kept_B).astype(jnp.int32)
    assert emitted_B.shape == (B,)
    return emitted_B, hit_B


def write_tokens(buffer_BY: jax.Array, at_B: jax.Array, ids_BT: jax.Array, count_B: jax.Array) -> jax.Array:
    """buffer_BY with ids_BT[b, :count_B[b]] written at slots at_B[b] onward (slots past the end dropped)."""
    B, T = ids_BT.shape
    assert at_B.shape == (B,)
    assert count_B.shape == (B,)
    steps_T = jnp.arange(T, dtype=jnp.int32)
    slots_BT = jnp.where(steps_T[None, :] < count_B[:, None], at_B[:, None] + steps_T[None, :], buffer_BY.shape[1])
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    return buffer_BY.at[rows_BT, slots_BT].set(ids_BT.astype(buffer_BY.dtype), mode="drop")


def verified_guesses(draft_len_B: jax.Array, accepted_B: jax.Array) -> jax.Array:
    """The draft tokens a verify pass judged: the accepted ones and the first rejected one (the rest
    were never compared with anything)."""
    assert draft_len_B.shape == accepted_B.shape
    verified_B = jnp.minimum(accepted_B + 1, draft_len_B)
    assert verified_B.shape == draft_len_B.shape
    return verified_B


def decayed_evidence(
    hits_B: jax.Array, trials_B: jax.Array, new_hits_B: jax.Array, new_trials_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The acceptance evidence after new trials: older evidence weighs FORGET less each time a row
    verifies anything (a row that drafted nothing keeps what it had)."""
    assert hits_B.shape == new_hits_B.shape
    assert trials_B.shape == new_trials_B.shape
    forget_B = jnp.where(new_trials_B > 0, FORGET, 1.0)
    return hits_B * forget_B + new_hits_B, trials_B * forget_B + new_trials_B


def record_outcome(
    state: SpeculativeState, token_B: jax.Array, draft_len_B: jax.Array, accepted_B: jax.Array,
    active_B: jax.Array, next_guess_B: jax.Array,
) -> dict:  # fmt: skip
    """The acceptance evidence of this iteration: verified drafts (accepted ones, and the first
    rejected one), and last iteration's unverified guess checked against this iteration's t0."""
    assert token_B.shape == accepted_B.shape
    assert draft_len_B.shape == accepted_B.shape
    shadow_B = active_B & (state.guess_B >= 0)
    trials_B = verified_guesses(draft_len_B, accepted_B) + shadow_B
    hits_B = accepted_B + (shadow_B & (state.guess_B == token_B))
    hits_B, trials_B = decayed_evidence(state.hits_B, state.trials_B, hits_B, trials_B)
    return dict(
        hits_B=hits_B, trials_B=trials_B, guess_B=next_guess_B, drafted_B=state.drafted_B + draft_len_B,
        accepted_B=state.accepted_B + accepted_B, passes_B=state.passes_B + (draft_len_B > 0),
    )  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """An iteration decided before its verify pass: t0, the draft, and the width to verify. Made at
    the end of the previous iteration, so each width's loop can test it without a conditional. A
    DraftModel's draft is made later, in its width's loop (ids_BT and draft_BT hold t0 and -1 here)."""

    token_B: jax.Array  # int32: t0 (pad where the row is not active)
    ids_BT: jax.Array  # int32: [t0, the draft] at the widest width
    draft_BT: jax.Array  # int32: the drafted tokens
    found_B: jax.Array  # bool: the row has a draft
    draft_len_B: jax.Array  # int32: draft tokens this pass verifies
    width_index: jax.Array  # int32 scalar: into the drafter's widths
    active_B: jax.Array  # bool: the row still makes tokens
    step_keys_B2: jax.Array  # picked t0; a pass that verifies a draft derives its acceptance keys from them


def plan_step(
    state: SpeculativeState, max_new: jax.Array, params: SamplingParams, flags: SamplerFlags, lookup, weights,
    pad_id: int,
) -> Plan:  # fmt: skip
    """t0 of every row, its draft (a lookup, or the draft model's steps) and the width to verify."""
    B = state.count_B.shape[0]
    cache = state.decode.cache
    active_B = ~state.decode.done_B & (state.count_B < max_new)
    keys_B2 = step_keys(state)
    token_B = jnp.where(active_B, pick_first(state, params, flags, keys_B2), pad_id)
    history_BS = state.history_BS.at[jnp.arange(B), cache.end_B].set(token_B, mode="drop")
    if isinstance(lookup, DraftModel):  # drafts once the width is known (speculative_step); no free guess
        draft_BT, found_B = jnp.full((B, lookup.max_draft), -1, jnp.int32), jnp.ones((B,), jnp.bool_)
    else:
        draft_BT, found_B = lookup_draft(history_BS, cache.start_B, cache.end_B, lookup)
    limit_B = jnp.clip(max_new - state.count_B - 1, 0, lookup.max_draft)  # never draft past max_new_tokens
    costs = pass_prices(lookup, weights, B)
    remaining_B = (max_new - state.count_B).astype(jnp.float32)
    width_index = choose_width(state.hits_B, state.trials_B, found_B, limit_B, active_B, lookup, costs, remaining_B)
    draft_len_B = jnp.where(found_B & active_B, jnp.minimum(limit_B, jnp.asarray(lookup.widths)[width_index]), 0)
    ids_BT = jnp.concatenate([token_B[:, None], jnp.where(found_B[:, None], draft_BT, token_B[:, None])], axis=1)
    plan = Plan(token_B, ids_BT, draft_BT, found_B, draft_len_B, width_index, active_B, keys_B2)
    assert plan.ids_BT.shape == (B, lookup.max_draft + 1)
    return plan


def count_emitted(
    seen_BV: jax.Array, counts_BV: jax.Array, ids_BT: jax.Array, emitted_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """seen_BV and counts_BV with each row's first emitted_B[b] tokens of ids_BT added (inactive rows
    emit 0). Scatters over the B * T tokens: a one-hot over the vocabulary would write B * T * V
    entries a step, and only the emitted tokens may count (never the padding after them)."""
    B, T = ids_BT.shape
    assert emitted_B.shape == (B,)
    assert seen_BV.shape == counts_BV.shape
    emitted_BT = jnp.arange(T)[None, :] < emitted_B[:, None]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    new_seen_BV = seen_BV.at[rows_BT, ids_BT].max(emitted_BT)
    new_counts_BV = counts_BV.at[rows_BT, ids_BT].add(emitted_BT.astype(counts_BV.dtype))
    assert new_seen_BV.dtype == jnp.bool_
    return new_seen_BV, new_counts_BV


def model_draft(
    state: SpeculativeState, plan: Plan, width: int, drafter, params: SamplingParams, flags: SamplerFlags
) -> tuple[jax.Array, jax.Array | None, Any]:  # fmt: skip
    """ids_BT ([t0, the draft], width + 1 columns on), q_BTV and the draft cache of an iteration of
    `width` (static): a DraftModel drafts now, `width` steps; a lookup's plan holds its draft already."""
    if not isinstance(drafter, DraftModel) or width == 0:
        return plan.ids_BT, None, state.draft_cache
    draft_BT, q_BTV, draft_cache = run_draft_model(state, plan.token_B, drafter, width, params, flags,
                                                   accept_keys(plan.step_keys_B2))  # fmt: skip
    ids_BT = jnp.concatenate([plan.token_B[:, None], draft_BT], axis=1)
    assert ids_BT.shape == (plan.token_B.shape[0], width + 1)
    assert q_BTV.shape[1] == width + 1
    return ids_BT, q_BTV, draft_cache


def speculative_step(
    state: SpeculativeState, plan: Plan, width: int, drafter, tokens_BY: jax.Array, base_B: jax.Array,
    eos_U: jax.Array, params: SamplingParams, flags: SamplerFlags, weights: GPT2Weights, config: GPT2Config,
) -> tuple[SpeculativeState, jax.Array]:  # fmt: skip
    """One iteration of a plan whose width is `width` (static): a DraftModel's draft, the verify pass
    of 1 + width positions, acceptance, emission. tokens_BY receives each row's tokens at slot
    count_B - base_B on."""
    B = state.count_B.shape[0]
    assert tokens_BY.shape[0] == B
    decode, cache, active_B = state.decode, state.decode.cache, plan.active_B
    ids_BT, q_BTV, draft_cache = model_draft(state, plan, width, drafter, params, flags)
    ids_BT = ids_BT[:, : width + 1]  # a lookup's plan holds max_draft guesses: a narrower pass reads fewer
    keys_B2 = accept_keys(plan.step_keys_B2) if width > 0 else plan.step_keys_B2  # width 0 accepts nothing
    new_cache, accepted_B, logits_BV, residual_q_BV = verify(
        ids_BT, plan.draft_len_B, state, params, flags, keys_B2, weights, config, q_BTV
    )
    # The bookkeeping below waits for the pass. Left free, XLA runs what does not depend on it (at
    # width 0 nearly all of it: nothing is accepted) beside the kernels' matmuls, on the cores their
    # threads use, and slows every matmul of the step.
    logits_BV, accepted_B, ids_BT, active_B, history_BS, tokens_BY, seen_BV, counts_BV = jax.lax.optimization_barrier(
        (logits_BV, accepted_B, ids_BT, active_B, state.history_BS, tokens_BY, decode.seen_BV, decode.counts_BV)
    )
    emitted_B, eos_hit_B = emitted_lengths(ids_BT, accepted_B + 1, eos_U[None, :])
    emitted_B = jnp.where(active_B, emitted_B, 0)
    seen_BV, counts_BV = count_emitted(seen_BV, counts_BV, ids_BT, emitted_B)
    new_decode = dataclasses.replace(
        decode, cache=dataclasses.replace(new_cache, end_B=cache.end_B + emitted_B), logits_BV=logits_BV,
        seen_BV=seen_BV, counts_BV=counts_BV,
        done_B=decode.done_B | (active_B & eos_hit_B),
        step_B=decode.step_B + 1,
    )  # fmt: skip
    full_history_BS = write_tokens(history_BS, cache.end_B, ids_BT, jnp.where(active_B, ids_BT.shape[1], 0))
    next_guess_B = jnp.where(active_B & plan.found_B & (plan.draft_len_B == 0), plan.draft_BT[:, 0], -1)
    if width == 0:  # nothing drafted, nothing rejected: the old q stays, unread
        residual_q_BV, residual_B = state.residual_q_BV, state.residual_B & ~active_B
    else:
        residual_q_BV = jnp.where(active_B[:, None], residual_q_BV, state.residual_q_BV)
        residual_B = jnp.where(active_B, accepted_B < plan.draft_len_B, state.residual_B)
    new_state = dataclasses.replace(
        state, decode=new_decode, history_BS=full_history_BS, count_B=state.count_B + emitted_B,
        residual_q_BV=residual_q_BV, residual_B=residual_B, draft_cache=draft_cache,
        **record_outcome(state, plan.token_B, plan.draft_len_B, accepted_B, active_B, next_guess_B),
    )  # fmt: skip
    tokens_BY = write_tokens(tokens_BY, state.count_B - base_B, ids_BT, emitted_B)
    return new_state, tokens_BY


def pick_last(
    state: SpeculativeState, tokens_BY: jax.Array, base_B: jax.Array, max_new: jax.Array, eos_U: jax.Array,
    params: SamplingParams, flags: SamplerFlags, pad_id: int,
) -> tuple[SpeculativeState, jax.Array]:  # fmt: skip
    """Once no row has two or more tokens to go, the rows with one left pick it without a forward pass
    (its logits would never be used), as plain generation does."""
    B = state.count_B.shape[0]
    assert base_B.shape == (B,)
    running_B = ~state.decode.done_B
    remaining_B = max_new - state.count_B
    finishing_B = running_B & (remaining_B == 1) & ~jnp.any(running_B & (remaining_B >= 2))
    token_B = jnp.where(finishing_B, pick_first(state, params, flags, step_keys(state)), pad_id)
    tokens_BY = write_tokens(tokens_BY, state.count_B - base_B, token_B[:, None], finishing_B.astype(jnp.int32))
    done_B = state.decode.done_B | (finishing_B & jnp.isin(token_B, eos_U))
    new_state = dataclasses.replace(
        state, decode=dataclasses.replace(state.decode, done_B=done_B), count_B=state.count_B + finishing_B,
        guess_B=jnp.full_like(state.guess_B, -1),
    )  # fmt: skip
    assert new_state.count_B.shape == (B,)
    return new_state, tokens_BY


def decode_speculative(
    state: SpeculativeState, max_new: jax.Array, eos_U: jax.Array, params: SamplingParams, flags: SamplerFlags,
    lookup: PromptLookup, weights: GPT2Weights, config: GPT2Config, pad_id: int, num_slots: int,
    max_iterations: int,
) -> tuple[SpeculativeState, jax.Array, jax.Array]:  # fmt: skip
    """Iterate until every row is done or has max_new tokens (or max_iterations iterations ran).

    Returns the new state, tokens_BY (this call's tokens of each row, from slot 0) and their count
    per row. num_slots must hold what max_iterations can emit: max_iterations * (max_draft + 1) + 1
    tokens, or max_new.
    """
    B = state.count_B.shape[0]
    assert num_slots >= 1
    assert max_iterations >= 1
    base_B = state.count_B
    tokens_BY = jnp.full((B, num_slots), pad_id, jnp.int32)

    def keep_going(i, state):
        return (i < max_iterations) & jnp.any(~state.decode.done_B & (max_new - state.count_B >= 2))

    def plan(state):
        return plan_step(state, max_new, params, flags, lookup, weights, pad_id)

    # One while loop per width, each looping while the plan asks for its width, inside one outer
    # loop. A lax.switch over the widths made XLA copy the KV cache in and out of the conditional:
    # the optimized HLO held two cache copies per branch; a while loop keeps its carry in place.
    def widths_in_turn(carry):
        for index, width in enumerate(lookup.widths):

            def this_width(carry, index=index):
                i, state, plan_now, _ = carry
                return keep_going(i, state) & (plan_now.width_index == index)

            def step(carry, width=width):
                i, state, plan_now, tokens_BY = carry
                state, tokens_BY = speculative_step(
                    state, plan_now, width, lookup, tokens_BY, base_B, eos_U, params, flags, weights, config
                )
                return i + 1, state, plan(state), tokens_BY

            carry = jax.lax.while_loop(this_width, step, carry)
        return carry

    carry = (jnp.zeros((), jnp.int32), state, plan(state), tokens_BY)
    _, state, _, tokens_BY = jax.lax.while_loop(lambda c: keep_going(c[0], c[1]), widths_in_turn, carry)
    state, tokens_BY = pick_last(state, tokens_BY, base_B, max_new, eos_U, params, flags, pad_id)
    counts_B = state.count_B - base_B
    assert counts_B.shape == (B,)
    return state, tokens_BY, counts_B


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """How the drafts fared, per row: draft tokens verified, accepted, and verify passes that had any."""

    drafted_B: jax.Array
    accepted_B: jax.Array
    passes_B: jax.Array

    @staticmethod
    def of(state: SpeculativeState) -> "SpeculationStats":
        return SpeculationStats(state.drafted_B, state.accepted_B, state.passes_B)
