"""The serving engine: continuous batching over decode slots, prompts prefilled in chunks, shared
prompt prefixes reused. The host side: it schedules; slots.py holds the device state and programs.

One scheduling round (`step`):

    waiting --short prompts and scoring prompts, several at once (prefill_rows): first tokens--> Slots
    waiting --start--> staging <--restore-- prefix cache (blocks of PREFIX_BLOCK prompt tokens, LRU)
    staging --prefill chunks (at most prefill_chunk tokens a round)--> staging --save--> prefix cache
    staging --admit: pick the first token, copy the prompt's slots into the lowest free row--> Slots
    rows [0, W) of Slots --decode_chunk: up to chunk_steps steps--> tokens, logprobs --> host
                         (speculate_chunk with Engine(speculate=PromptLookup()): several tokens a step)
    host: a TextFinisher per sequence --> Event --> deliver(event)

A round dispatches its decode chunk before it hands out the previous round's (JAX runs the chunk
while this thread delivers, reads the inbox and prefills), so a row that finished in one chunk
rides along in the next, its tokens there dropped. A constrained row (structured output) gets the
mask of each token after a chunk's first from the host inside the chunk (kernels/host_masks.py:
between two steps the chunk calls `_GrammarRows`, which feeds the row's grammar its pick and writes
its next mask), so it runs whole chunks beside the others; the round feeds the previous chunk's last
tokens to the grammars before it dispatches (the first step's masks), and hands them out after.
Under speculation (or without the kernel library) a chunk with a constrained row is one step, and
each chunk is handed out first.

W, the width, is the smallest compiled width (1, 2, 4, ..., max_batch) that holds every busy row:
one client decodes at batch 1, eight at batch 8. When the busy rows would fit a smaller width, the
highest ones move down (a copy of their filled slots). A long prompt is prefilled a chunk per round,
so running streams keep getting tokens while it is read; the first token comes straight from the
prefill. Prompts up to BATCH_PROMPT_LEN tokens and a chunk (most chat turns, the benchmark's) skip
staging: the ones at the head of the queue are prefilled together in one pass over a fresh cache of
their length, written straight into free rows, as `generate` prefills a batch (measured on gpt2, 8
prompts of 32 tokens: half the CPU time of eight one-row prefills through the S-slot staging).
Requests sharing a prompt prefix (a system prompt, few-shot examples) copy its keys and values from
the prefix cache instead of computing them again. Scoring requests (prompt logprobs) too: a block a
scoring prompt computed keeps its tokens' logprobs beside its keys and values, so an evaluation
harness's continuations of one context compute only what follows the context's whole blocks
(through staging; a scoring prompt with no such block goes in a batch, which saves its blocks).

Rows are independent (see kvcache.py): a row's tokens do not depend on its slot, its neighbours or
when it joined, so greedy output equals `generate` on the same prompt, and a sampled sequence with
seed s and index i equals row i of `generate(..., seed=s)` (its key is fold_in(PRNGKey(s), i) and it
folds in its own step count).

The engine is a plain object: `submit`, `cancel` and `begin_drain` may be called from any thread;
`step` runs one scheduling round and is what the background thread (`start`) calls in a loop.
Each sequence's events go to the `deliver` callback given at submit, called on the engine thread.
"""

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import GPT2Config, tokens_in_vocabulary
from jax_gpt2.constraints import CompiledConstraint
from jax_gpt2.generate import PAD_ID
from jax_gpt2.kernels import host_masks, native
from jax_gpt2.kvcache import check_kv_dtype
from jax_gpt2.sampling import (
    SamplingSettings, check_token_settings, end_token_ids, mask_words, row_keys, sampling_params,
)
from jax_gpt2.serve import slots
from jax_gpt2.serve.events import Event, TokenLogprob
from jax_gpt2.serve.prefix_cache import PrefixCache, score_positions
from jax_gpt2.serve.programs import Job, Programs
from jax_gpt2.serve.slots import PREFIX_BLOCK, TOP_LOGPROBS
from jax_gpt2.sharding import data_shards
from jax_gpt2.speculate import PromptLookup
from jax_gpt2.stopping import TextFinisher
from jax_gpt2.weights import GPT2Weights

log = logging.getLogger(__name__)


# How often a round that waits for returning clients looks at the chunk in flight (`_await_returns`).
RETURN_POLL_S = 0.001
# How long an idle device waits for the clients of rows that all ended in one chunk (`_regroup`).
REGROUP_WAIT_S = 0.05
# How long an idle engine that took a request waits for the ones the server is still preparing (`_gather`).
GATHER_LIMIT_S = 0.05


class QueueFull(Exception):
    """Too many sequences wait for a slot; the caller should retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What picking made, on the host: step k, row b (Y and B are 1 for a first token)."""

    tokens_YB: np.ndarray
    emitted_YB: np.ndarray
    logprob_YB: np.ndarray  # float32: log-probability of the chosen token (of `pick_logits`' distribution)
    top_ids_YBA: np.ndarray
    top_logprobs_YBA: np.ndarray

    def emitted(self, row: int) -> list[int]:
        """The tokens row `row` (a column of the outputs) emitted, in order."""
        token_Y = self.tokens_YB[self.emitted_YB[:, row], row].tolist()
        assert len(token_Y) <= self.tokens_YB.shape[0]
        return token_Y


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """A decode chunk dispatched and not yet handed out: its outputs (device arrays, maybe still being
    computed), speculate_chunk's counts, and the sequence each column ran when it was dispatched."""

    outputs: tuple
    counts: tuple
    sequences: tuple  # _Sequence | None per column
    _host: list = dataclasses.field(default_factory=list)  # the outputs on the host, once fetched

    def fetched(self) -> StepOutput:
        """The outputs on the host (waits for the chunk the first time; later calls reuse them)."""
        if not self._host:
            self._host.append(StepOutput(*jax.device_get(self.outputs)))
        assert len(self._host) == 1
        return self._host[0]


@dataclasses.dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate (one choice of one prompt)."""

    prompt_ids: tuple[int, ...]
    settings: SamplingSettings
    index: int = 0  # its key is fold_in(PRNGKey(seed), index): row `index` of generate(..., seed=seed)
    num_logprobs: int | None = None  # generated tokens: None, or 0..TOP_LOGPROBS alternatives each
    prompt_logprobs: int | None = None  # prompt tokens: None, or 0..TOP_LOGPROBS alternatives each
    constraint: CompiledConstraint | None = None  # structured output: the answer's grammar


# Batched prefill lengths from 32 on go up in steps of this many tokens (see batch_buckets): a batch
# pads to a multiple of 16 (at most 15 slots a prompt), for two more programs of each width than 1.5x steps.
BATCH_STEP = 16


def batch_buckets(chunk_buckets: list[int], longest: int) -> list[int]:
    """The batched prefill's prompt lengths: the chunk buckets up to `longest`, 24, and every multiple
    of BATCH_STEP between those of 32 and more: a batch is padded to its longest prompt's bucket, and a
    batch of 65-token prompts in 128 slots would be half padding (scoring batches run up to 128). 24
    splits the one doubling left from 16 on: a chat turn of 17-24 tokens took 32 slots, a third of
    them padding in a pass that stalls every decoding row."""
    assert longest in chunk_buckets
    buckets = {bucket for bucket in chunk_buckets if bucket <= longest}
    buckets |= {step for step in range(32, longest, BATCH_STEP) if step > min(32, longest)}
    buckets |= {24} if 16 in buckets and 24 < longest else set()
    result = sorted(buckets)
    assert result[-1] == longest
    return result


def powers_of_two_to(limit: int, start: int = 1) -> list[int]:
    """start, 2 start, 4 start, ... below limit, then limit itself: few compiled shapes, little waste."""
    assert start >= 1
    assert limit >= 1
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    assert sizes == sorted(set(sizes))
    return sizes


def check_speculate(speculate):
    """The engine speculates by prompt lookup only: a draft model would need a second cache per row."""
    if speculate is None or isinstance(speculate, PromptLookup):
        return speculate
    raise ValueError(f"serve speculates with prompt lookup (PromptLookup, --speculate lookup) only; "
                     f"got {type(speculate).__name__}")  # fmt: skip


def check_request(request: SequenceRequest, vocab_size: int, context_length: int) -> None:
    """Host validation of one sequence beyond its settings (which checked themselves): a ValueError
    naming the problem, before anything reaches the device."""
    prompt = request.prompt_ids
    if not isinstance(request.settings, SamplingSettings):
        raise ValueError(f"settings must be SamplingSettings; got {type(request.settings).__name__}")
    check_token_settings(request.settings, vocab_size)
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: it needs at least one token")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt token ids must be integers")
    if not tokens_in_vocabulary(prompt, vocab_size):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got [{min(prompt)}, {max(prompt)}]")
    wanted = len(prompt) + request.settings.max_new_tokens
    if wanted > context_length:
        raise ValueError(
            f"this model's context is {context_length} tokens; the prompt has {len(prompt)} and max_tokens is "
            f"{request.settings.max_new_tokens} ({wanted} in all)"
        )
    if request.constraint is not None and request.constraint.grammar_tokenizer.vocab_size != vocab_size:
        raise ValueError(f"the constraint was compiled for {request.constraint.grammar_tokenizer.vocab_size} tokens, "
                         f"not this model's {vocab_size}")  # fmt: skip
    for name in ("num_logprobs", "prompt_logprobs"):
        value = getattr(request, name)
        if value is not None and not 0 <= value <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}]; got {value}")


def _spec(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An abstract argument with no sharding: on one device, how a call with committed arrays lowers too."""
    assert isinstance(shape, tuple)
    assert all(size >= 1 for size in shape)
    return jax.ShapeDtypeStruct(shape, dtype)


def _abstract(tree):
    """The pytree's arrays (host, or device arrays on one device) as ShapeDtypeStructs with no sharding."""

    def one(x) -> jax.ShapeDtypeStruct:
        assert not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1, "one device only: see Engine.__init__"
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

    abstract = jax.tree.map(one, tree)
    assert jax.tree.structure(abstract) == jax.tree.structure(tree)
    return abstract


class _GrammarRows:
    """The host side of a chunk's grammar masks (kernels/host_masks.py): the sequence in each column of
    the chunk in flight, set by the engine thread before it dispatches. Called from inside the chunk
    (on an XLA thread) between one step's pick and the next step's logits: each constrained row's
    grammar takes the token the row just picked, then writes the row's next mask."""

    def __init__(self) -> None:
        self.sequences: tuple = ()
        self.table_1 = np.array([host_masks.register(self)], np.int32)  # the chunk's argument that finds this

    def __call__(self, token_W: np.ndarray, picks_W: np.ndarray, allowed_WK: np.ndarray) -> None:
        assert token_W.shape == (len(self.sequences),)
        assert picks_W.shape == token_W.shape
        for w, seq in enumerate(self.sequences):
            if seq is None or seq.matcher is None:
                continue
            seq.feed_grammar(int(picks_W[w]) - 1, [int(token_W[w])])  # a token it has is not fed again
            seq.matcher.write_allowed(allowed_WK[w])


class _Sequence:
    """Host bookkeeping of one sequence: its text finisher and counts. Engine-thread only."""

    def __init__(self, seq_id: int, request: SequenceRequest, deliver: Callable[[Event], None], tokenizer,
                 eos_ids: set[int]) -> None:  # fmt: skip
        settings = request.settings
        self.seq_id, self.request, self.deliver, self.tokenizer = seq_id, request, deliver, tokenizer
        self.finisher = TextFinisher(tokenizer, settings.stop, end_token_ids(settings, sorted(eos_ids)),
                                     settings.max_new_tokens, settings.include_stop_str_in_output)  # fmt: skip
        self.num_picked = 0  # tokens picked on the device, an eos included
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # sent with the first event
        self.cached_tokens = 0  # prompt tokens the prefix cache supplied (sent with every event)
        self.matcher = None if request.constraint is None else request.constraint.new_matcher()
        self.grammar_fed = 0  # generated tokens the grammar has taken (it may run ahead of `take`)
        self.grammar_done_at: int | None = None  # the answer was complete after this many tokens

    @property
    def filled_slots(self) -> int:
        """An upper bound of the cache slots the sequence fills: its prompt and every token picked."""
        return len(self.request.prompt_ids) + self.num_picked

    def feed_grammar(self, first: int, token_Y: list[int]) -> None:
        """Advance the grammar by generated tokens first, first + 1, ... (those it has not taken yet;
        none once the answer is complete). The chunk's host callback, the round before a dispatch and
        `take` each feed what they have first: every token is fed once, in order."""
        assert self.matcher is not None
        assert first <= self.grammar_fed or self.grammar_done_at is not None, "no token skipped"
        for index, token in enumerate(token_Y, start=first):
            if index < self.grammar_fed:
                continue
            if self.grammar_done_at is not None:
                break
            self.matcher.advance(token)
            self.grammar_fed += 1
            if self.matcher.done:
                self.grammar_done_at = self.grammar_fed

    def take(self, token_Y: list[int], out: StepOutput, row: int) -> Event:
        """This row's new tokens (of one chunk, or a first token) as one event; finishes the sequence when it ends."""
        assert self.finisher.finish_reason is None
        assert len(token_Y) <= out.tokens_YB.shape[0]
        ids, text, logprobs = [], [], []
        for k, token in enumerate(token_Y):
            self.num_picked += 1
            kept = self.finisher.num_tokens
            text.append(self.finisher.push(token))
            if self.finisher.num_tokens > kept:  # an eos is not kept in the text or the ids
                ids.append(token)
            # ... but it has a logprob: harnesses read the last entry as the token the model picked after the prompt
            logprobs.append(self._logprob(token, out, k, row))
            if self.matcher is not None:
                self.feed_grammar(self.num_picked - 1, [token])
                # The grammar may have run ahead (a chunk in flight feeds it): ask where it was done.
                complete = self.grammar_done_at is not None and self.num_picked >= self.grammar_done_at
                if complete and self.finisher.finish_reason is None:
                    text.append(self.finisher.stop())
            if self.finisher.finish_reason is not None:
                break
        return self.event(ids, "".join(text), logprobs)

    def event(self, ids: list[int], text: str, logprobs: list[TokenLogprob]) -> Event:
        wanted = self.request.num_logprobs is not None
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return Event(self.seq_id, tuple(ids), text, tuple(logprobs) if wanted else None,
                     self.finisher.finish_reason, prompt_logprobs, cached_tokens=self.cached_tokens)  # fmt: skip

    def _logprob(self, token: int, out: StepOutput, k: int, row: int) -> TokenLogprob | None:
        assert out.tokens_YB[k, row] == token
        assert out.top_ids_YBA.shape[2] >= (self.request.num_logprobs or 0)
        if self.request.num_logprobs is None:
            return None
        top = []
        for alt, value in zip(out.top_ids_YBA[k, row], out.top_logprobs_YBA[k, row]):
            if len(top) < self.request.num_logprobs and np.isfinite(value):  # filtered tokens have -inf
                top.append((int(alt), self.text(int(alt)), float(value)))
        return TokenLogprob(token, self.text(token), float(out.logprob_YB[k, row]), tuple(top))

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def set_prompt_logprobs(self, chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """From the prefill chunks' outputs: prompt token j's entry comes from position j - 1."""
        prompt, num_top = self.request.prompt_ids, self.request.prompt_logprobs
        logprob_T, top_ids_TA, top_logprobs_TA = (np.concatenate(parts) for parts in zip(*chunks))
        assert logprob_T.shape[0] == len(prompt)
        entries = [TokenLogprob(prompt[0], self.text(prompt[0]), None, ())]
        for j in range(1, len(prompt)):
            top = tuple((int(t), self.text(int(t)), float(v)) for t, v in zip(top_ids_TA[j - 1], top_logprobs_TA[j - 1]))
            entries.append(TokenLogprob(prompt[j], self.text(prompt[j]), float(logprob_T[j - 1]), top[:num_top]))
        self.prompt_logprobs = tuple(entries)


# Padding slots a staging chunk may carry before its prompt is split into smaller chunks instead: each
# more chunk streams every weight once more (~12 ms for gpt2 in float32 on a 2-core Xeon, what ~16
# tokens of a chunk's arithmetic cost), so splitting pays only past about that much padding.
SPLIT_WASTE = 16
# The longest generating prompt a batched prefill takes (longer ones go through staging, a chunk at a
# time, and save and reuse prefix blocks): chat turns and the serving benchmark's prompts fit.
BATCH_PROMPT_LEN = 63
# The longest prompt a batch of scoring requests takes: 8 rows of 128 positions' logits are ~200 MB
# in float32 for GPT-2's vocabulary; longer prompts go through staging, a chunk at a time.
MAX_SCORE_BATCH_LEN = 128


@dataclasses.dataclass
class _Prefill:
    """The prompt in the staging cache: how many of its tokens are in, and its prompt logprobs so far."""

    seq: _Sequence
    done: int
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class Engine:
    """Continuous batching over max_batch rows; see the module docstring. No global state: two
    engines (say, in one test process) share only the jitted functions' compile caches."""

    def __init__(
        self, weights: GPT2Weights, config: GPT2Config, tokenizer, max_batch: int = 8, max_seq_len: int = 1024,
        max_queue: int = 64, chunk_steps: int = 4, prefill_chunk: int = 128, prefix_cache_mib: float = 256,
        kv_dtype=jnp.float32, speculate: PromptLookup | None = None,
    ) -> None:  # fmt: skip
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("chunk_steps", chunk_steps),
                            ("prefill_chunk", prefill_chunk)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        for name, value in (("max_queue", max_queue), ("prefix_cache_mib", prefix_cache_mib)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        self.weights, self.config, self.tokenizer = weights, config, tokenizer
        self.speculate = check_speculate(speculate)
        self.drafted_tokens = 0  # draft tokens verified (speculate only)
        self.accepted_tokens = 0  # draft tokens the model accepted
        self.verify_passes = 0  # decode passes that verified a draft
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.max_batch, self.max_queue, self.chunk_steps = max_batch, max_queue, chunk_steps
        self.context_length = S = min(max_seq_len, config.n_positions)
        data = data_shards(weights.mesh)
        if max_batch % data != 0:
            raise ValueError(f"max_batch={max_batch} must divide by the mesh's data axis ({data})")
        # On a mesh every width splits evenly over "data", so a step never regathers its rows.
        self.widths = [width for width in powers_of_two_to(max_batch) if width % data == 0]
        self.copy_buckets = powers_of_two_to(S, start=8)
        self.chunk_buckets = powers_of_two_to(min(prefill_chunk, S), start=8)
        # Generating prompts up to BATCH_PROMPT_LEN tokens and a chunk are prefilled several at once,
        # without staging (and reuse no prefix blocks).
        self.batch_limit = min(BATCH_PROMPT_LEN, self.chunk_buckets[-1])
        # Scoring prompts (prompt logprobs) go in batches up to a whole chunk, or MAX_SCORE_BATCH_LEN: the
        # logits of every position of a batch are one (W * T, V) block.
        self.score_limit = min(self.chunk_buckets[-1], MAX_SCORE_BATCH_LEN)
        self.batch_buckets = batch_buckets(self.chunk_buckets, self._chunk_bucket(max(self.batch_limit, self.score_limit)))
        block_bytes = 2 * config.n_layer * config.n_embd * PREFIX_BLOCK * jnp.dtype(self.kv_dtype).itemsize
        self.prefix_cache = PrefixCache(int(prefix_cache_mib * 2**20) // block_bytes if S > PREFIX_BLOCK else 0)
        eos = [] if config.eos_token_id is None else [config.eos_token_id]
        self.eos_ids = set(eos)
        self._slots, self._staging = self._empty_state()
        self._rows: list[_Sequence | None] = [None] * max_batch
        self._prefill: _Prefill | None = None
        self._in_flight: _Chunk | None = None  # dispatched by one step, handed out by the next
        self._freed = False  # the last hand-out freed rows: their clients may be about to send again
        self._arriving = 0  # requests between their arrival and `submit` (`arriving`), under _lock
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards _arriving and the two counters below, shared with other threads
        self._num_waiting = 0  # submitted, not yet prefilling
        self._num_running = 0  # prefilling or in a row
        self._accepting, self._stopping = True, False
        self._drain_deadline: float | None = None  # monotonic time; set once, by begin_drain
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.reused_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        # On a mesh, a state array's sharding changes as programs run (staging moves onto the mesh at its
        # first prefill), so shapes taken now would not name the programs the engine runs: no jobs there;
        # the server warms a mesh engine up eagerly (`warm_up`), and an unwarmed one compiles at first use.
        on_mesh = weights.mesh is not None
        # Constrained rows get their masks from the host inside the chunk, through the kernel library
        # (kernels/host_masks.py); not on a mesh, nor under speculation (one-step chunks there).
        self._grammar_in_chunk = not on_mesh and speculate is None and native.kernels_available()
        self._grammar_rows = _GrammarRows()
        self.programs = Programs([], []) if on_mesh else Programs(self._compile_jobs(), first=self._first_programs())
        assert self.copy_buckets[-1] == S
        assert self.chunk_buckets[-1] <= S

    @property
    def num_active(self) -> int:
        """Sequences being prefilled or decoded."""
        return self._num_running

    @property
    def num_queued(self) -> int:
        """Sequences waiting for their prefill to start."""
        return self._num_waiting

    @property
    def busy(self) -> bool:
        return (self._prefill is not None or len(self._waiting) > 0 or any(seq is not None for seq in self._rows)
                or self._in_flight is not None)  # fmt: skip

    def submit(self, requests: Sequence[SequenceRequest], deliver: Callable[[Event], None]) -> list[int]:
        """Queue sequences (all or none); returns their ids. Raises ValueError, QueueFull or EngineClosed.

        At most max_batch + max_queue sequences are in the engine at once: max_queue is the waiting
        room beyond the slots (0: a request is taken only if a slot is free for each of its sequences).
        """
        assert len(requests) >= 1
        for request in requests:
            check_request(request, self.config.vocab_size, self.context_length)
        capacity = self.max_batch + self.max_queue
        if len(requests) > capacity:
            raise ValueError(f"at most {capacity} sequences per request (prompts x n; max_batch + max_queue); "
                             f"got {len(requests)}")  # fmt: skip
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if self._num_waiting + self._num_running + len(requests) > capacity:
                raise QueueFull(f"{self._num_running} sequences run and {self._num_waiting} wait "
                                f"(max_batch={self.max_batch}, max_queue={self.max_queue})")  # fmt: skip
            self._num_waiting += len(requests)
            sequences = [_Sequence(next(self._ids), r, deliver, self.tokenizer, self.eos_ids) for r in requests]
            for seq in sequences:
                self._inbox.put(("submit", seq))
        assert len(sequences) == len(requests)
        return [seq.seq_id for seq in sequences]

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a server's work on one request from its arrival to its `submit` (parsing, tokenizing,
        on other threads): an idle engine that takes a request first waits, at most GATHER_LIMIT_S, for
        the requests still inside such a block, so that requests that came together start together."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1
                assert self._arriving >= 0

    def cancel(self, seq_ids: Sequence[int]) -> None:
        """Drop sequences (the client went away): a waiting one leaves the queue, a running one its slot."""
        for seq_id in seq_ids:
            self._inbox.put(("cancel", seq_id))

    def begin_drain(self, timeout_s: float) -> None:
        """Take no new requests; sequences still running timeout_s from now end with an error event.

        Only plain assignments: safe to call from a signal handler (the engine thread acts on it)."""
        assert timeout_s >= 0
        self._accepting = False
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout_s

    def step(self) -> bool:
        """One scheduling round: read the inbox, prefill, move rows down, dispatch a decode chunk and hand
        out the one before it. True if busy.

        The chunk is dispatched before the previous one is handed out, so the cores decode while this
        thread delivers tokens, reads the inbox and prefills: done in turns, both cores idled through
        that host work, ~6% of a busy server's time at batch 8. A row that finished in the previous
        chunk rides along in the new one (its tokens there are dropped: `_collect`). A constrained
        row's next mask needs its last token: the previous chunk's tokens are fetched and fed to the
        rows' grammars first (`_feed_grammars`), and only the hand-out waits for the dispatch. With
        speculation chunks are taken in turns. After a hand-out that freed rows, the round first
        waits, at most until the chunk in flight is done, for those clients' next requests
        (`_await_returns`); when the chunk in flight ends every busy row, it is handed out first
        and the freed clients' requests are awaited for one prefill pass (`_regroup`)."""
        self._read_inbox(block=False)
        if self._freed and self._in_flight is not None:
            self._await_returns(self._in_flight)
        self._freed = False
        if self._ends_in_flight():
            self._regroup()
        self._prefill_round()
        self._compact()
        previous, self._in_flight = self._in_flight, None
        overlap = self._may_overlap()
        if previous is not None and not overlap:
            self._collect(previous)
            previous = None
        if previous is not None and any(seq is not None and seq.matcher is not None for seq in self._rows):
            self._feed_grammars(previous)
        if any(seq is not None for seq in self._rows):
            chunk = self._dispatch_chunk()
            if overlap:
                self._in_flight = chunk
            else:
                self._collect(chunk)
        if previous is not None:
            self._collect(previous)
        assert len(self._rows) == self.max_batch
        return self.busy

    def _chunk_kinds(self) -> tuple[bool, ...]:
        """The chunk programs of each width: without the grammar callback, and with it where used."""
        return (False, True) if self._grammar_in_chunk else (False,)

    def _may_overlap(self) -> bool:
        """Whether the next chunk may be dispatched before the last one's tokens are handed out."""
        return self.speculate is None

    def warm_up(self) -> None:
        """Compile everything load can reach (every prefill bucket, copy bucket and width). Call while idle."""
        assert not self.busy
        assert self._thread is None
        zero, one, S = np.int32(0), np.int32(1), self.context_length
        for T in self.chunk_buckets:
            ids_1T = np.zeros((1, T), np.int32)
            self._staging, last_logits_1V, _ = slots.prefill_chunk_jit(
                self._staging, ids_1T, one, ids_1T, np.bool_(True), self.weights, self.config
            )
            self._staging = slots.begin_prompt_jit(self._staging)
        for bucket in self.copy_buckets:
            self._slots = slots.copy_prompt_jit(self._slots, self._staging, zero, bucket=bucket)
            self._slots = slots.move_slots_jit(self._slots, zero, zero, bucket=bucket)
        self._slots = slots.move_state_jit(self._slots, zero, zero)
        self._slots, _ = slots.admit_jit(self._slots, last_logits_1V, np.zeros((1, S), np.int32), np.ones((1,), np.int32),
                                         np.zeros((1,), np.int32), *self._row_settings([], 1),
                                         use_kernel=self.weights.use_kernels)  # fmt: skip
        for W in self.widths:
            for T in self.batch_buckets:
                ids_WT, rows_W = np.zeros((W, T), np.int32), np.full((W,), self.max_batch, np.int32)  # every row dropped
                self._slots = slots.prefill_rows_jit(self._slots, ids_WT, np.ones((W,), np.int32), rows_W, ids_WT,
                                                     np.bool_(True), *self._row_settings([], W), self.weights,
                                                     self.config)[0]  # fmt: skip
        for width, grammar in itertools.product(self.widths, self._chunk_kinds()):
            allowed_WK, single_W = self._allowed([], width), np.zeros((width,), np.bool_)
            chunk, arguments = self._chunk_program(width, self.weights, grammar)
            self._slots = chunk(self._slots, allowed_WK, single_W, *arguments)[0]
        self._slots = slots.release_jit(self._slots, np.ones((self.max_batch,), np.bool_))
        if self.prefix_cache.capacity > 0:
            k, v = slots.read_block_jit(self._staging, zero, zero)
            slots.read_block_jit(self._slots.cache, zero, zero)
            self._staging = slots.restore_block_jit(self._staging, k, v, zero, zero)
        jax.block_until_ready((self._slots, self._staging))
        self._slots, self._staging = self._empty_state()
        self.programs.mark_all_compiled()

    def _chunk_program(self, width: int, weights, grammar: bool) -> tuple[Callable, tuple]:
        """The chunk program of `width` and its arguments after (slots, allowed_WK, single_W):
        decode_chunk, or speculate_chunk when the engine speculates (it also returns its counts).
        grammar: constrained rows get their masks inside the chunk (`_grammar_rows`) and it runs whole.
        weights: the engine's, or their abstract shapes (a compile job)."""
        assert width in self.widths
        assert self.chunk_steps >= 1
        assert not grammar or self._grammar_in_chunk
        if self.speculate is None:
            table_1 = self._grammar_rows.table_1 if grammar else None
            return slots.decode_chunk_jit, (weights, self.config, width, self.chunk_steps, table_1)
        return slots.speculate_chunk_jit, (self.speculate, weights, self.config, width, self.chunk_steps)

    def _first_programs(self) -> list[tuple]:
        """What a short single request runs: its random key, a one-row prefill of the first bucket,
        width-1 decode chunks, and the release of its row. The rest waits for the background (or its first use)."""
        # The longest compile first: two threads compile these (compile_for_first_request).
        first = [("decode_chunk", self.widths[0], False), ("prefill_rows", 1, self.batch_buckets[0]), ("row_keys",),
                 ("release",)]  # fmt: skip
        assert self.widths[0] == 1
        assert len(first) == 4
        return first

    def _compile_jobs(self) -> list[Job]:
        """One job per program the engine can run, on abstract shapes (see programs.py for why that is
        safe beside the engine thread), in the order the background compiles them: the likeliest next
        needs first (longer short prompts, more clients), long prompts and wide prefills last. Each
        call mirrors the engine's own call (positional or keyword alike), so it lowers to the same key."""
        config, K = self.config, mask_words(self.config.vocab_size)
        assert self.weights.mesh is None, "see __init__: no jobs on a mesh"
        state, staging, weights = _abstract(self._slots), _abstract(self._staging), _abstract(self.weights)
        i32, flag = _spec((), jnp.int32), _spec((), jnp.bool_)
        # A request's random keys are a few tiny eager ops on the host's device, beside the slots, not on them.
        jobs = [Job(("row_keys",), functools.partial(row_keys, 0, [0]))]

        def add(key: tuple, jitted, *args, **kwargs) -> None:
            jobs.append(Job(key, lambda: jitted.lower(*args, **kwargs).compile()))

        def prefill_rows(W: int, T: int) -> None:
            add(("prefill_rows", W, T), slots.prefill_rows_jit, state, _spec((W, T), jnp.int32), _spec((W,), jnp.int32),
                _spec((W,), jnp.int32), _spec((W, T), jnp.int32), flag, *_abstract(self._row_settings([], W)), weights,
                config)  # fmt: skip

        def decode_chunk(W: int, grammar: bool) -> None:
            chunk, arguments = self._chunk_program(W, weights, grammar)
            add(("decode_chunk", W, grammar), chunk, state, _spec((W, K), jnp.int32), _spec((W,), jnp.bool_), *arguments)

        for T in self.batch_buckets:
            prefill_rows(1, T)
        for W in self.widths:
            decode_chunk(W, False)
        add(("release",), slots.release_jit, state, _spec((self.max_batch,), jnp.bool_))
        add(("move_state",), slots.move_state_jit, state, i32, i32)
        for bucket in self.copy_buckets:
            add(("move_slots", bucket), slots.move_slots_jit, state, i32, i32, bucket=bucket)
        add(("begin_prompt",), slots.begin_prompt_jit, staging)
        for T in self.chunk_buckets:
            add(("prefill_chunk", T), slots.prefill_chunk_jit, staging, _spec((1, T), jnp.int32), i32,
                _spec((1, T), jnp.int32), flag, weights, config)  # fmt: skip
        for bucket in self.copy_buckets:
            add(("copy_prompt", bucket), slots.copy_prompt_jit, state, staging, i32, bucket=bucket)
        jobs.append(Job(("admit",), functools.partial(self._compile_admit, state, staging, weights)))
        if self.prefix_cache.capacity > 0:
            block = jax.eval_shape(slots.read_block, staging, i32, i32)
            add(("read_block",), slots.read_block_jit, staging, i32, i32)
            add(("read_row_block",), slots.read_block_jit, state.cache, i32, i32)
            add(("restore_block",), slots.restore_block_jit, staging, *block, i32, i32)
        for W in self.widths[1:]:
            for T in self.batch_buckets:
                prefill_rows(W, T)
        for W in self.widths if self._grammar_in_chunk else []:  # last: only structured output runs them
            decode_chunk(W, True)
        assert len(jobs) == len({job.key for job in jobs})
        assert all(key in {job.key for job in jobs} for key in self._first_programs())
        return jobs

    def _compile_admit(self, state: slots.Slots, staging, weights: GPT2Weights) -> None:
        """admit's job: its logits argument has prefill_chunk's output type (traced here, in the job, not at start)."""
        T, i32 = self.chunk_buckets[0], _spec((), jnp.int32)
        prefill = functools.partial(slots.prefill_chunk, config=self.config)
        _, logits_1V, _ = jax.eval_shape(prefill, staging, _spec((1, T), jnp.int32), i32, _spec((1, T), jnp.int32),
                                         _spec((), jnp.bool_), weights)  # fmt: skip
        assert logits_1V.shape == (1, self.config.vocab_size)
        assert self.weights.mesh is None
        ones = _spec((1,), jnp.int32)
        slots.admit_jit.lower(state, _spec(logits_1V.shape, logits_1V.dtype), _spec((1, self.context_length), jnp.int32),
                              ones, ones, *_abstract(self._row_settings([], 1)),
                              use_kernel=self.weights.use_kernels).compile()  # fmt: skip

    @property
    def ready(self) -> bool:
        """The programs a short single request runs are compiled: a request is served without waiting for a compile."""
        return self.programs.ready.is_set()

    @property
    def warm(self) -> bool:
        """Every program is compiled: no request ever waits for a compile."""
        return self.programs.warm.is_set()

    def compile_for_first_request(self) -> None:
        """Compile (on abstract shapes, running nothing) what a short single request needs; sets `ready`.
        Any thread, before or after `start`. Two at a time: nothing else runs yet, so take two cores
        (the prefill and the decode chunk compile side by side: about half a cold start's wait on two)."""
        assert self.weights.mesh is None, "a mesh engine is warmed up eagerly (warm_up)"
        self.programs.compile(self.programs.first, threads=2)
        assert self.ready
        assert self.programs.num_compiled >= len(self.programs.first)

    def compile_the_rest(self) -> None:
        """Compile every other program (any thread, beside a running engine: see programs.py); sets `warm`."""
        assert self.weights.mesh is None, "a mesh engine is warmed up eagerly (warm_up)"
        self.programs.compile_all()
        assert self.warm
        assert self.ready

    def start(self) -> None:
        """Run scheduling rounds on a background thread until `shutdown`."""
        assert self._thread is None
        self._thread = threading.Thread(target=self._run, name="jax-gpt2-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with drain, finish every submitted sequence first; then stop the thread."""
        with self._lock:
            self._accepting = False
            self._inbox.put(("stop", drain))
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive() or timeout is not None

    def _run(self) -> None:
        while True:
            try:
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline and self.busy:
                    log.warning("drain timeout: ending the sequences still running")
                    self._fail_all("the server is shutting down (drain timeout)")
                if not self.busy:
                    if self._stopping:
                        return
                    self._read_inbox(block=True)
                    self._gather()
                    continue
                self.step()
            except Exception:  # a failed round must not kill the server: fail its sequences, start clean
                log.exception("engine round failed; failing the sequences in flight")
                self._fail_all("generation failed")

    def _await_returns(self, chunk: _Chunk) -> None:
        """After a hand-out freed rows: read the inbox until requests wait for every free row or the
        chunk in flight is done, whichever comes first.

        A client whose answer just ended sends its next request a few ms later, while the chunk
        dispatched before the hand-out runs. Without this wait the round would dispatch the next
        chunk at once, without it, and its prompt would be prefilled a whole chunk later. The wait
        ends with the chunk in flight, so the device idles at most RETURN_POLL_S for it (a fixed
        wait idled a device whose chunks are short). 8 clients on the gpt2 shape, 2-core Xeon: TTFT
        p50 399-429 -> 277-282 ms (benchmarks/serve_load.py)."""
        assert self._in_flight is chunk
        done = chunk.outputs[0]
        self._read_inbox_while(lambda: len(self._waiting) < self._rows.count(None) and not done.is_ready(), math.inf)
        assert self._in_flight is chunk

    def _read_inbox_while(self, keep_waiting: Callable[[], bool], deadline: float) -> None:
        """Take the inbox's messages as they come while keep_waiting() holds, until `deadline`
        (time.monotonic()), looking again every RETURN_POLL_S when none comes."""
        while keep_waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                message = self._inbox.get(timeout=min(remaining, RETURN_POLL_S))
            except queue.Empty:
                continue
            self._handle(*message)

    def _ends_in_flight(self) -> bool:
        """Every busy row reaches its max_tokens inside the chunk in flight (dispatched with all of them,
        it picks up to chunk_steps tokens a row). A sure end, not a likely one: an eos or a stop may end
        a row sooner."""
        running = [seq for seq in self._rows if seq is not None]
        if self._in_flight is None or not running:
            return False
        return all(seq.request.settings.max_new_tokens - seq.num_picked <= self.chunk_steps for seq in running)

    def _regroup(self) -> None:
        """Hand out the chunk in flight, which ends every busy row, before anything else; then, the
        device idle, wait at most REGROUP_WAIT_S for the next requests of the clients it freed, so that
        they and the prompts waiting already are prefilled in one pass and decode in step.

        Without it, rows that fell out of step stayed out of step: 8 clients of equal max_tokens, one
        prefilled a round before the others, finished 1 + 7 (or 6 + 2) each time, and every round paid
        two prefill passes, one of them stalling the other rows (the device runs the chunk in flight
        before any prefill, so handing it out first costs only the clients' way back). With `_gather`,
        8 clients on the gpt2 shape, 2-core Xeon: 0.92x -> 0.96x of `generate` at batch 8, AVX2 build
        0.88-0.91x -> 0.99x (benchmarks/serve_load.py; docs/guides/serving.md)."""
        chunk, self._in_flight = self._in_flight, None
        assert chunk is not None
        free_before = self._rows.count(None)
        self._collect(chunk)
        # Enough once a request waits for each row just freed (or for every free row).
        wanted = min(self._rows.count(None), len(self._waiting) + self._rows.count(None) - free_before)
        self._read_inbox_while(lambda: len(self._waiting) < wanted, time.monotonic() + REGROUP_WAIT_S)
        self._freed = False  # their returns are in (or late): no wait for them behind the next chunk
        assert self._in_flight is None

    def _gather(self) -> None:
        """After an idle engine took its first requests: read the inbox on while the server prepares
        others (`arriving`), at most GATHER_LIMIT_S. Eight clients that start together reached the
        engine ~5 ms apart (their bodies tokenized one by one); the first was prefilled alone, the
        others a prefill later, a chunk behind it, and the rows stayed out of step (each round then
        cost two prefill passes until `_regroup`). A lone request waits for nothing (at most one poll,
        while its own block closes)."""
        assert self._in_flight is None, "only an idle engine gathers: nothing runs that a wait would stall"
        assert all(seq is None for seq in self._rows)
        self._read_inbox_while(lambda: self._arriving > 0 and not self._stopping, time.monotonic() + GATHER_LIMIT_S)

    def _read_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        assert kind in ("submit", "cancel", "stop")
        if kind == "submit":
            self._waiting.append(payload)
        elif kind == "stop":
            self._stopping = True
            if not payload:
                self._fail_all("the server is shutting down")
        else:
            self._cancel(payload)

    def _cancel(self, seq_id: int) -> None:
        for seq in [seq for seq in self._waiting if seq.seq_id == seq_id]:
            self._waiting.remove(seq)
            self._count(waiting=-1)
        if self._prefill is not None and self._prefill.seq.seq_id == seq_id:
            self._prefill = None
            self._count(running=-1)
        rows = [row for row, seq in enumerate(self._rows) if seq is not None and seq.seq_id == seq_id]
        for row in rows:
            self._rows[row] = None
            self._count(running=-1)
        if rows:
            self._release(rows)

    def _count(self, waiting: int = 0, running: int = 0) -> None:
        with self._lock:
            self._num_waiting += waiting
            self._num_running += running
            assert self._num_waiting >= 0
            assert self._num_running >= 0

    def _prefill_round(self) -> None:
        """Prefill chunks, of one prompt or several short ones, until prefill_chunk tokens are spent:
        running streams wait at most that long for their next tokens. With nothing decoding nobody
        waits, so every prompt that has a free row is prefilled at once (requests arriving together
        then start decoding together, as one batch of `generate` would). Short prompts at the head
        of the queue go in together, one batched pass (`_prefill_batch`); the rest through staging."""
        assert len(self._rows) == self.max_batch
        assert self._prefill is None or self._prefill.seq not in self._rows, "a prefilling sequence holds no row yet"
        decoding = any(seq is not None for seq in self._rows)
        budget = self.chunk_buckets[-1] if decoding else math.inf
        while budget > 0:
            batch = self._take_batch(budget) if self._prefill is None else []
            if batch:
                budget -= self._prefill_batch(batch)
            elif self._prefill is not None or self._start_prefill():
                budget -= self._prefill_one_chunk()
            else:
                return

    def _batchable(self, seq: _Sequence) -> bool:
        """A prompt that needs no staging: it generates and has no whole prefix block to reuse or save,
        or it wants its prompt logprobs (a scoring request), fits one chunk and starts with no block
        whose scores are cached (one that does goes through staging, which restores the blocks)."""
        request = seq.request
        if request.settings.max_new_tokens == 0:
            return False
        if request.prompt_logprobs is not None:
            prompt = request.prompt_ids
            return len(prompt) <= self.score_limit and self.prefix_cache.num_scored(prompt, len(prompt) - 1) == 0
        return len(request.prompt_ids) <= self.batch_limit

    def _take_batch(self, budget: float) -> list[_Sequence]:
        """Short prompts from the head of the queue, one per free row, while their padded tokens fit the budget."""
        assert self._prefill is None
        free, batch = self._rows.count(None), []
        for seq in self._waiting:
            if len(batch) == free or not self._batchable(seq):
                break
            longest = max(len(s.request.prompt_ids) for s in [*batch, seq])
            if batch and self._width_for(len(batch) + 1) * self._batch_bucket(longest) > budget:
                break
            batch.append(seq)
        for _ in batch:
            self._waiting.popleft()
            self._count(waiting=-1, running=1)
        assert len(batch) <= free
        return batch

    def _prefill_batch(self, batch: list[_Sequence]) -> int:
        """Prefill short prompts together into free rows and hand out their first tokens. Returns the
        tokens computed (padding included)."""
        assert 1 <= len(batch) <= self._rows.count(None)
        W = self._width_for(len(batch))
        T = self._batch_bucket(max(len(seq.request.prompt_ids) for seq in batch))
        assert T in self.batch_buckets
        self.programs.ensure(("prefill_rows", W, T))
        ids_WT, num_prompt_W = np.full((W, T), PAD_ID, np.int32), np.ones((W,), np.int32)
        next_ids_WT = np.full((W, T), PAD_ID, np.int32)
        rows_W = np.full((W,), self.max_batch, np.int32)  # padding entries point past the last row: dropped
        free = [row for row, seq in enumerate(self._rows) if seq is None]
        for p, seq in enumerate(batch):
            prompt = seq.request.prompt_ids
            ids_WT[p, : len(prompt)], num_prompt_W[p], rows_W[p] = prompt, len(prompt), free[p]
            next_ids_WT[p, : len(prompt) - 1] = prompt[1:]
        scoring = [p for p, seq in enumerate(batch) if seq.request.prompt_logprobs is not None]
        self._slots, outputs, prompt_outputs = slots.prefill_rows_jit(
            self._slots, ids_WT, num_prompt_W, rows_W, next_ids_WT, np.bool_(bool(scoring)), *self._row_settings(batch, W),
            self.weights, self.config,
        )  # fmt: skip
        out = StepOutput(*(part[None] for part in jax.device_get(outputs)))  # Y = 1
        if scoring:
            logprob_WT, top_ids_WTA, top_logprobs_WTA = jax.device_get(prompt_outputs)
            for p in scoring:
                prompt = batch[p].request.prompt_ids
                outputs_T = tuple(part[p, : len(prompt)] for part in (logprob_WT, top_ids_WTA, top_logprobs_WTA))
                batch[p].set_prompt_logprobs([outputs_T])
                self._save_prefix(prompt, self._slots.cache, free[p], outputs_T)
        for p, seq in enumerate(batch):
            self._rows[free[p]] = seq
        self._hand_out({free[p]: [int(out.tokens_YB[0, p])] for p in range(len(batch))}, out,
                       {free[p]: p for p in range(len(batch))})  # fmt: skip
        return W * T

    def _row_settings(self, batch: list[_Sequence], width: int) -> tuple[np.ndarray, ...]:
        """keys_W2, params_W, limit_W, want_logprobs_W, allowed_WK (the first token's grammar mask) of
        the batch's sequences, padded to width rows."""
        assert len(batch) <= width
        requests = [seq.request for seq in batch]
        keys_W2, limit_W, want_W = np.zeros((width, 2), np.uint32), np.zeros((width,), np.int32), np.zeros((width,), np.bool_)
        for p, request in enumerate(requests):
            keys_W2[p] = row_keys(request.settings.seed, [request.index])[0]
            limit_W[p], want_W[p] = request.settings.max_new_tokens, request.num_logprobs is not None
        settings = [request.settings for request in requests] + [SamplingSettings()] * (width - len(requests))
        assert len(settings) == width
        return keys_W2, sampling_params(settings, sorted(self.eos_ids)), limit_W, want_W, self._allowed(batch, width)

    def _allowed(self, rows: list["_Sequence | None"], width: int) -> np.ndarray:
        """allowed_WK: each constrained sequence's packed grammar mask for its next token (the grammar
        engine writes it in place: nothing unpacked, 1/8 of a bool mask's bytes sent); -1, every token,
        elsewhere."""
        assert len(rows) <= width
        allowed_WK = np.full((width, mask_words(self.config.vocab_size)), -1, np.int32)
        for row, seq in enumerate(rows):
            if seq is not None and seq.matcher is not None:
                seq.matcher.write_allowed(allowed_WK[row])
        return allowed_WK

    def _chunk_bucket(self, num_tokens: int) -> int:
        return next(bucket for bucket in self.chunk_buckets if bucket >= num_tokens)

    def _batch_bucket(self, num_tokens: int) -> int:
        return next(bucket for bucket in self.batch_buckets if bucket >= num_tokens)

    def _chunk_size(self, remaining: int) -> int:
        """How many of a staging prompt's remaining tokens its next chunk computes: as many as the largest
        bucket takes, unless padding them to their bucket would waste more than SPLIT_WASTE slots; then
        the largest bucket they fill, and the rest in the next chunks (an 80-token prompt as 64 + 16,
        not 128). Results do not depend on the split but for float32 rounding: a query attends the same in
        any chunk of 16 slots or more (bit for bit), by the decode kernel's arithmetic in a smaller one."""
        assert remaining >= 1
        n = min(self.chunk_buckets[-1], remaining)
        if self._chunk_bucket(n) - n <= SPLIT_WASTE:
            return n
        filled = [bucket for bucket in self.chunk_buckets if bucket <= n]
        return filled[-1] if filled else n

    def _start_prefill(self) -> bool:
        """Move the next waiting sequence into staging (if it will find a free row), restoring cached prefix blocks."""
        assert self._prefill is None, "one prompt in staging at a time"
        if not self._waiting:
            return False
        seq = self._waiting[0]
        if seq.request.settings.max_new_tokens > 0 and None not in self._rows:
            return False
        self._waiting.popleft()
        self._count(waiting=-1, running=1)
        prompt = seq.request.prompt_ids
        self.programs.ensure(("begin_prompt",))
        self._staging = slots.begin_prompt_jit(self._staging)
        done, chunks = self._restore_prefix(prompt, seq.request.prompt_logprobs is not None)
        self._prefill = _Prefill(seq, done, chunks)
        self.reused_tokens += done
        seq.cached_tokens = done
        assert self._prefill.done < len(prompt) or len(prompt) == 0, "at least the last token is computed"
        assert self._num_waiting >= len(self._waiting)  # submit counts a request before it reaches the queue
        return True

    def _restore_prefix(self, prompt: tuple[int, ...], scoring: bool) -> tuple[int, list]:
        """Cached prefix blocks of the prompt into staging. Returns how many of its tokens are in, and
        the prompt logprobs they bring (a scoring prompt's). The last token is always computed (its
        logits pick the first new token); a scoring prompt computes its last reused token again too,
        as the first of its chunks, since that position's logprob is of the token after the blocks."""
        reusable = len(prompt) - 1
        if scoring:
            found = self.prefix_cache.match_scored(prompt, reusable)
            blocks, scores = [(k, v) for k, v, _ in found], [block_scores for _, _, block_scores in found]
        else:
            blocks, scores = self.prefix_cache.match(prompt, reusable), []
        done = len(blocks) * PREFIX_BLOCK - (1 if scoring and blocks else 0)
        for i, (k, v) in enumerate(blocks):
            self.programs.ensure(("restore_block",))
            end = min((i + 1) * PREFIX_BLOCK, done)
            self._staging = slots.restore_block_jit(self._staging, k, v, np.int32(i * PREFIX_BLOCK), np.int32(end))
        # Each block's scores are a chunk's outputs in the same layout: the job's first chunks.
        assert not scores or sum(block_scores[0].shape[0] for block_scores in scores) == done, "a score a position"
        assert done < len(prompt) or len(prompt) == 0
        return done, scores

    def _prefill_one_chunk(self) -> int:
        """The next chunk of the staging prompt; admits it when the prompt is all in. Returns the tokens computed."""
        job = self._prefill
        assert job is not None
        prompt = job.seq.request.prompt_ids
        n = self._chunk_size(len(prompt) - job.done)
        assert n >= 1, "a prompt in staging has tokens left to compute"
        T = self._chunk_bucket(n)
        ids_1T, next_ids_1T = np.full((1, T), PAD_ID, np.int32), np.full((1, T), PAD_ID, np.int32)
        ids_1T[0, :n] = prompt[job.done : job.done + n]
        following = prompt[job.done + 1 : job.done + n + 1]
        next_ids_1T[0, : len(following)] = following
        want = job.seq.request.prompt_logprobs is not None
        self.programs.ensure(("prefill_chunk", T))
        self._staging, last_logits_1V, logprobs = slots.prefill_chunk_jit(
            self._staging, ids_1T, np.int32(n), next_ids_1T, np.bool_(want), self.weights, self.config
        )
        if want:
            job.chunks.append(tuple(part[:n] for part in jax.device_get(logprobs)))
        job.done += n
        assert job.done <= len(prompt)
        if job.done == len(prompt):
            self._prefill = None
            self._finish_prefill(job, last_logits_1V)
        return T

    def _finish_prefill(self, job: _Prefill, last_logits_1V: jax.Array) -> None:
        """Save the prompt's new prefix blocks; then end a scoring-only sequence, or start it in a free row."""
        seq, prompt = job.seq, job.seq.request.prompt_ids
        if seq.request.prompt_logprobs is not None:
            outputs_T = tuple(np.concatenate(parts) for parts in zip(*job.chunks))
            seq.set_prompt_logprobs([outputs_T])
            self._save_prefix(prompt, self._staging, 0, outputs_T)
        else:
            self._save_prefix(prompt, self._staging, 0)
        if seq.request.settings.max_new_tokens == 0:
            self._count(running=-1)
            self._deliver(seq, seq.event([], "", []))
            return
        assert None in self._rows, "_start_prefill admits a generating prompt only when a row is free"
        assert seq not in self._rows
        row = self._rows.index(None)
        bucket = next(b for b in self.copy_buckets if b >= len(prompt))
        self.programs.ensure(("copy_prompt", bucket))
        self.programs.ensure(("admit",))
        self._slots = slots.copy_prompt_jit(self._slots, self._staging, np.int32(row), bucket=bucket)
        prompt_1S = np.full((1, self.context_length), PAD_ID, np.int32)
        prompt_1S[0, : len(prompt)] = prompt
        self._slots, outputs = slots.admit_jit(
            self._slots, last_logits_1V, prompt_1S, np.array([len(prompt)], np.int32), np.array([row], np.int32),
            *self._row_settings([seq], 1), use_kernel=self.weights.use_kernels,
        )  # fmt: skip
        out = StepOutput(*(part[None] for part in jax.device_get(outputs)))  # Y = 1
        self._rows[row] = seq
        assert self._rows.count(seq) == 1
        self._hand_out({row: [int(out.tokens_YB[0, 0])]}, out, {row: 0})

    def _save_prefix(self, prompt: tuple[int, ...], cache, row: int, outputs_T: tuple | None = None) -> None:
        """Save the prompt's whole blocks that the prefix cache lacks, read from `row` of `cache` (staging,
        or the decode row a batched prefill just wrote); with a scoring prompt's outputs (position t's
        logprob of the next token and its top, for every position), each block's scores too."""
        if self.prefix_cache.capacity == 0:
            return
        chain = self.prefix_cache.keys(prompt, len(prompt))
        program = "read_block" if cache is self._staging else "read_row_block"
        for i, key in enumerate(chain):
            if key not in self.prefix_cache.blocks:
                self.programs.ensure((program,))
                self.prefix_cache.add(key, slots.read_block_jit(cache, np.int32(row), np.int32(i * PREFIX_BLOCK)))
            if outputs_T is not None and key not in self.prefix_cache.scores:
                first, end = score_positions(i)
                self.prefix_cache.add_scores(key, tuple(part[first:end].copy() for part in outputs_T))
        self.prefix_cache.use(chain)

    def _width_for(self, num_rows: int) -> int:
        return next(width for width in self.widths if width >= num_rows)

    def _compact(self) -> None:
        """Move the highest busy rows into free lower ones while that lets the chunk run narrower."""
        busy = [row for row, seq in enumerate(self._rows) if seq is not None]
        target = self._width_for(max(len(busy), 1))
        # A chunk still in flight writes up to chunk_steps slots a row past what the host has counted;
        # the copy runs after it, and must take those slots too.
        ahead = self.chunk_steps if self._in_flight is not None else 0
        for source in sorted((row for row in busy if row >= target), reverse=True):
            destination = self._rows.index(None)
            assert destination < target
            seq = self._rows[source]
            bucket = next(b for b in self.copy_buckets if b >= min(seq.filled_slots + ahead, self.context_length))
            self.programs.ensure(("move_slots", bucket))
            self.programs.ensure(("move_state",))
            self._slots = slots.move_slots_jit(self._slots, np.int32(source), np.int32(destination), bucket=bucket)
            self._slots = slots.move_state_jit(self._slots, np.int32(source), np.int32(destination))
            self._rows[destination], self._rows[source] = seq, None
        assert all(seq is None for seq in self._rows[target:])

    def _dispatch_chunk(self) -> _Chunk:
        """Start a decode chunk over the busy rows (the device runs it while this thread goes on)."""
        width = self._width_for(1 + max(row for row, seq in enumerate(self._rows) if seq is not None))
        sequences = tuple(self._rows[:width])
        single_W = np.array([seq is not None and seq.matcher is not None for seq in sequences])
        allowed_WK = self._allowed(list(sequences), width)
        grammar = bool(single_W.any()) and self._grammar_in_chunk
        if grammar:  # the chunk's callback feeds these rows' grammars from step 1 on (nothing else does meanwhile)
            self._grammar_rows.sequences = sequences
        self.programs.ensure(("decode_chunk", width, grammar))
        chunk, arguments = self._chunk_program(width, self.weights, grammar)
        self._slots, outputs, *counts = chunk(self._slots, allowed_WK, single_W, *arguments)
        return _Chunk(outputs, tuple(counts), sequences)

    def _collect(self, chunk: _Chunk) -> None:
        """Hand a chunk's tokens to the sequences it ran that are still in a row, wherever `_compact`
        moved them since; one that finished or was cancelled meanwhile gets nothing (its row ran on)."""
        if chunk.counts:  # speculate_chunk's
            drafted, accepted, passes = (int(x) for x in jax.device_get(chunk.counts[0]))
            self.drafted_tokens, self.accepted_tokens = self.drafted_tokens + drafted, self.accepted_tokens + accepted
            self.verify_passes += passes
        out, columns = chunk.fetched(), self._columns(chunk)
        picked = {row: out.emitted(k) for row, k in columns.items()}
        self._hand_out(picked, out, columns)

    def _columns(self, chunk: _Chunk) -> dict[int, int]:
        """Each row's column in the chunk's outputs, for the sequences it ran that still hold a row."""
        row_of = {id(seq): row for row, seq in enumerate(self._rows) if seq is not None}  # chunk keeps them alive
        return {row_of[id(seq)]: k for k, seq in enumerate(chunk.sequences) if seq is not None and id(seq) in row_of}

    def _feed_grammars(self, chunk: _Chunk) -> None:
        """The chunk's tokens into its constrained rows' grammars ahead of the hand-out (those its
        callback has not fed: the last), so the next chunk's first masks can be computed before it.
        The chunk's first token is the row's pick number num_picked: every chunk before it is handed out."""
        out = chunk.fetched()
        for row, k in self._columns(chunk).items():
            seq = self._rows[row]
            if seq.matcher is not None:
                seq.feed_grammar(seq.num_picked, out.emitted(k))

    def _hand_out(self, picked: dict[int, list[int]], out: StepOutput, column: dict[int, int]) -> None:
        """Hand each row's picked tokens to its sequence; deliver the events; free the rows that finished."""
        finished = []
        for row, token_Y in picked.items():
            seq = self._rows[row]
            assert token_Y, f"row {row} is running on the host but was done on the device"
            event = seq.take(token_Y, out, column[row])
            if event.finish_reason is not None:
                self._rows[row] = None
                self._count(running=-1)
                finished.append(row)
            if event.token_ids or event.text or event.finish_reason or event.prompt_logprobs:
                self._deliver(seq, event)
        if finished:  # eos and max_tokens are done on the device already; stop strings are not
            self._release(finished)
            self._freed = True
        assert all(self._rows[row] is None for row in finished)

    def _release(self, rows: list[int]) -> None:
        assert rows
        assert all(0 <= row < self.max_batch for row in rows)
        free_B = np.zeros((self.max_batch,), np.bool_)
        free_B[rows] = True
        self.programs.ensure(("release",))
        self._slots = slots.release_jit(self._slots, free_B)

    def _deliver(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.deliver(event)
        except Exception:  # the receiver is gone (say, its event loop closed): free its slot
            log.warning("could not deliver to sequence %d; cancelling it", seq.seq_id, exc_info=True)
            if event.finish_reason is None:
                self.cancel([seq.seq_id])

    def _empty_state(self) -> tuple[slots.Slots, "slots.KVCache"]:
        dtype, S = self.kv_dtype, self.context_length
        empty = slots.empty_slots_on(self.weights.mesh, self.config, self.max_batch, S, dtype)
        return empty, slots.empty_staging_jit(self.config, S, dtype)

    def _fail_all(self, message: str) -> None:
        """End every sequence in the engine with an error event and start from empty slots."""
        staged = [self._prefill.seq] if self._prefill is not None else []
        sequences = [seq for seq in self._rows if seq is not None] + staged + list(self._waiting)
        self._count(waiting=-len(self._waiting), running=-(len(sequences) - len(self._waiting)))
        self._rows, self._waiting, self._prefill = [None] * self.max_batch, collections.deque(), None
        self._in_flight = None
        self._slots, self._staging = self._empty_state()
        for seq in sequences:
            self._deliver(seq, Event(seq.seq_id, (), "", None, "error", error=message))
        assert not self.busy
