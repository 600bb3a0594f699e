"""The serving engine: continuous batching over a fixed set of decode slots.

One preallocated KV cache holds `max_batch` rows ("slots") of `max_seq_len` cache slots each. A
request is prefilled alone (batch 1, prompt padded to a power-of-two bucket), then moved into a
free row between decode chunks; every row decodes `chunk_steps` tokens per dispatch; a finished
row (eos, stop string, max_tokens, cancelled) is marked done and its row is free for the next
request at once. Every shape is fixed when the engine is built, so load never recompiles:

    submit --> waiting (bounded) --admit: prefill 1 x bucket, roll, copy into row b--> slots
    slots --decode_chunk: K steps of every row (done rows emit nothing)--> tokens, logprobs
    host: detokenize, stop strings, max_tokens --> Event per sequence --> deliver(event)

Shape letters beyond model.py's: K the steps of one chunk, A the top alternatives per token
(logprobs). Rows are independent (see kvcache.py): a row's tokens do not depend on its slot, on
its neighbours or on when it joined, so greedy output equals `generate` on the same prompt, and
a sampled sequence with seed s and index i equals row i of `generate(..., seed=s)` (its key is
`fold_in(PRNGKey(s), i)` and it folds in its own step count).

The engine is a plain object: `submit` and `cancel` may be called from any thread; `step` runs
one scheduling round and is what the background thread (`start`) calls in a loop. Each
sequence's events go to the `deliver` callback given at submit, called on the engine's thread.
"""

import collections
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import GPT2Config
from jax_gpt2.generate import DecodeState, decode_step, left_pad, prefill
from jax_gpt2.kvcache import KVCache, check_kv_dtype
from jax_gpt2.model import empty_cache
from jax_gpt2.sampling import SamplerFlags, SamplingParams
from jax_gpt2.stopping import StopStringStream
from jax_gpt2.tokenizer import IncrementalDecoder
from jax_gpt2.weights import GPT2Weights

log = logging.getLogger(__name__)

# Every stage on, always: requests with different settings share one compiled step, and load never
# changes it. Greedy rows stay exact: penalty 1 is x / 1 or x * 1, and they take the argmax.
SERVER_FLAGS = SamplerFlags(sample=True, filter=True, penalize=True)
TOP_LOGPROBS = 5  # A: alternatives computed per token (the OpenAI API allows up to 5)
MAX_SEED = 2**32 - 1  # PRNGKey keeps 32 bits of the seed; larger seeds would silently collide


class QueueFull(Exception):
    """Too many sequences wait for a slot; the caller should retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """The device side of the engine: one DecodeState over max_batch rows, and each row's settings."""

    state: DecodeState
    params: SamplingParams
    limit_B: jax.Array  # int32: the row's max_tokens; the row is done after that many steps


@dataclasses.dataclass(frozen=True)
class ChunkOutput:
    """What one chunk made, on the host: step k, row b."""

    tokens_KB: np.ndarray
    emitted_KB: np.ndarray
    logprob_KB: np.ndarray  # float32: log-probability of the chosen token (of `pick_logits`' distribution)
    top_ids_KBA: np.ndarray
    top_logprobs_KBA: np.ndarray


@dataclasses.dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate (one choice of one prompt), settings with their "off" values."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    index: int = 0  # its key is fold_in(PRNGKey(seed), index): row `index` of generate(..., seed=seed)
    stops: tuple[str, ...] = ()
    num_logprobs: int | None = None  # None: no logprobs; 0..TOP_LOGPROBS alternatives per token


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # the token decoded alone
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (id, text, logprob) of the best alternatives, best first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one sequence: tokens (eos excluded), their text, and finish_reason once it ends."""

    seq_id: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # None while running; "stop", "length" or "error" at the end


def serve_buckets(context_length: int) -> list[int]:
    """Prefill lengths: powers of two from 8, then the context length itself (few compiles)."""
    assert context_length >= 1
    buckets = []
    bucket = 8
    while bucket < context_length:
        buckets.append(bucket)
        bucket *= 2
    buckets.append(context_length)
    assert buckets == sorted(set(buckets))
    return buckets


def empty_slots(config: GPT2Config, max_batch: int, max_seq_len: int, kv_dtype) -> Slots:
    """max_batch free (done) rows over a cache of max_seq_len slots, stored as kv_dtype."""
    assert max_batch >= 1
    assert max_seq_len >= 1
    B = max_batch
    state = DecodeState(
        cache=empty_cache(config, jnp.zeros((B,), jnp.int32), max_seq_len, kv_dtype),
        logits_BV=jnp.zeros((B, config.vocab_size), jnp.float32),
        seen_BV=jnp.zeros((B, config.vocab_size), jnp.bool_),
        done_B=jnp.ones((B,), jnp.bool_),
        keys_B=jnp.zeros((B, 2), jnp.uint32),
        step_B=jnp.zeros((B,), jnp.int32),
    )
    params = row_params([SequenceRequest((0,), 1)] * B)
    return Slots(state, jax.tree.map(jnp.asarray, params), jnp.zeros((B,), jnp.int32))


def row_params(requests: Sequence[SequenceRequest]) -> SamplingParams:
    """SamplingParams with one row per request (host arrays, fixed dtypes: no recompiles)."""
    assert len(requests) >= 1
    params = SamplingParams(
        temperature_B=np.array([r.temperature for r in requests], np.float32),
        top_k_B=np.array([r.top_k for r in requests], np.int32),
        top_p_B=np.array([r.top_p for r in requests], np.float32),
        min_p_B=np.array([r.min_p for r in requests], np.float32),
        repetition_penalty_B=np.array([r.repetition_penalty for r in requests], np.float32),
    )
    assert params.top_k_B.shape == (len(requests),)
    return params


def _set_row(all_B: jax.Array, row: jax.Array, one_1: jax.Array) -> jax.Array:
    assert one_1.shape[0] == 1
    assert one_1.shape[1:] == all_B.shape[1:]
    return all_B.at[row].set(one_1[0])


def admit(
    slots: Slots, ids_1T: jax.Array, start_1: jax.Array, keys_1: jax.Array, row: jax.Array,
    params_1: SamplingParams, limit: jax.Array, weights: GPT2Weights, config: GPT2Config,
) -> Slots:  # fmt: skip
    """Prefill one left-padded prompt and move it into `row`, its real tokens rolled to slot 0."""
    T = ids_1T.shape[1]
    assert ids_1T.shape[0] == 1
    assert T <= slots.state.cache.max_len
    new = prefill(ids_1T, start_1, keys_1, weights, config, T, slots.state.cache.k_LBNSH.dtype)
    shift = start_1[0]

    def move(cache_LBNSH: jax.Array, new_LBNSH: jax.Array) -> jax.Array:
        rolled_L1NTH = jnp.roll(new_LBNSH, -shift, axis=3)  # bucket padding would otherwise eat slots
        return jax.lax.dynamic_update_slice(cache_LBNSH, rolled_L1NTH, (0, row, 0, 0, 0))

    old = slots.state
    cache = KVCache(
        k_LBNSH=move(old.cache.k_LBNSH, new.cache.k_LBNSH),
        v_LBNSH=move(old.cache.v_LBNSH, new.cache.v_LBNSH),
        start_B=old.cache.start_B.at[row].set(0),
        end_B=old.cache.end_B.at[row].set(T - shift),
    )
    state = DecodeState(
        cache=cache,
        logits_BV=_set_row(old.logits_BV, row, new.logits_BV),
        seen_BV=_set_row(old.seen_BV, row, new.seen_BV),
        done_B=old.done_B.at[row].set(False),
        keys_B=_set_row(old.keys_B, row, keys_1),
        step_B=old.step_B.at[row].set(0),
    )
    params = jax.tree.map(lambda all_B, one_1: _set_row(all_B, row, one_1), slots.params, params_1)
    new_slots = Slots(state, params, slots.limit_B.at[row].set(limit))
    assert new_slots.state.cache.k_LBNSH.shape == old.cache.k_LBNSH.shape
    return new_slots


def decode_chunk(
    slots: Slots, eos_E: jax.Array, weights: GPT2Weights, config: GPT2Config, num_steps: int
) -> tuple[Slots, tuple[jax.Array, ...]]:
    """num_steps decode steps of every row; a row is done at eos or after limit_B[b] tokens.

    Returns the slots and (tokens_KB, emitted_KB, logprob_KB, top_ids_KBA, top_logprobs_KBA).
    """
    assert num_steps >= 1
    assert eos_E.ndim == 1

    def step(slots: Slots, _):
        state, token_B, emitted_B, picked_BV = decode_step(
            slots.state, eos_E, slots.params, weights, config, SERVER_FLAGS
        )
        state = dataclasses.replace(state, done_B=state.done_B | (state.step_B >= slots.limit_B))
        logprobs_BV = jax.nn.log_softmax(picked_BV, axis=-1)
        logprob_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
        top_logprobs_BA, top_ids_BA = jax.lax.top_k(logprobs_BV, TOP_LOGPROBS)
        outputs = (token_B, emitted_B, logprob_B, top_ids_BA.astype(jnp.int32), top_logprobs_BA)
        return Slots(state, slots.params, slots.limit_B), outputs

    slots, outputs = jax.lax.scan(step, slots, None, length=num_steps)
    assert outputs[0].shape == (num_steps, slots.limit_B.shape[0])
    return slots, outputs


def release(slots: Slots, free_B: jax.Array) -> Slots:
    """Mark rows done (a stop string hit, or the client went away): they emit nothing more."""
    assert free_B.shape == slots.state.done_B.shape
    assert free_B.dtype == jnp.bool_
    state = dataclasses.replace(slots.state, done_B=slots.state.done_B | free_B)
    return Slots(state, slots.params, slots.limit_B)


_admit_jit = jax.jit(admit, static_argnames=("config",), donate_argnames=("slots",))
_decode_chunk_jit = jax.jit(decode_chunk, static_argnames=("config", "num_steps"), donate_argnames=("slots",))
_release_jit = jax.jit(release, donate_argnames=("slots",))


def compiled_count() -> int:
    """How many programs the engine's jitted functions hold: constant once warmed up."""
    counts = [_admit_jit._cache_size(), _decode_chunk_jit._cache_size(), _release_jit._cache_size()]
    assert len(counts) == 3
    assert all(count >= 0 for count in counts)
    return sum(counts)


def check_request(request: SequenceRequest, vocab_size: int, context_length: int) -> None:
    """Host validation of one sequence: a ValueError naming the field, before it reaches the device."""
    prompt = request.prompt_ids
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: it needs at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got [{min(prompt)}, {max(prompt)}]")
    if request.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {request.max_tokens}")
    if len(prompt) + request.max_tokens > context_length:
        raise ValueError(
            f"this model's context is {context_length} tokens; the prompt has {len(prompt)} and max_tokens is "
            f"{request.max_tokens} ({len(prompt) + request.max_tokens} in all)"
        )
    if not (np.isfinite(request.temperature) and request.temperature >= 0):
        raise ValueError(f"temperature must be >= 0; got {request.temperature}")
    if request.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 is off); got {request.top_k}")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {request.top_p}")
    if not 0 <= request.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1]; got {request.min_p}")
    if not (np.isfinite(request.repetition_penalty) and request.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1 is off); got {request.repetition_penalty}")
    if not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}]; got {request.seed}")
    if any(not stop for stop in request.stops):
        raise ValueError("stop strings must be non-empty")
    if request.num_logprobs is not None and not 0 <= request.num_logprobs <= TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}]; got {request.num_logprobs}")


class _Sequence:
    """Host bookkeeping of one sequence: its detokenizer, stop strings and token count. Engine-thread only."""

    def __init__(self, seq_id: int, request: SequenceRequest, deliver: Callable[[Event], None], tokenizer) -> None:
        self.seq_id, self.request, self.deliver, self.tokenizer = seq_id, request, deliver, tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_stream = StopStringStream(request.stops)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def take(self, token_K: list[int], chunk: ChunkOutput, row: int, eos_ids: set[int]) -> Event:
        """Turn this row's new tokens of a chunk into one event; sets finish_reason when it ends."""
        assert self.finish_reason is None
        assert len(token_K) <= chunk.tokens_KB.shape[0]
        ids, text, logprobs = [], [], []
        for k, token in enumerate(token_K):
            if token in eos_ids:
                text.append(self._flush())
                self.finish_reason = "stop"
                break
            self.num_tokens += 1
            ids.append(token)
            logprobs.append(self._logprob(token, chunk, k, row))
            piece, hit = self.stop_stream.push(self.decoder.push(token))
            text.append(piece)
            if hit:
                self.finish_reason = "stop"
                break
            if self.num_tokens >= self.request.max_tokens:
                text.append(self._flush())
                self.finish_reason = "length"
                break
        wanted = self.request.num_logprobs is not None
        return Event(self.seq_id, tuple(ids), "".join(text), tuple(logprobs) if wanted else None, self.finish_reason)

    def _flush(self) -> str:
        tail, hit = self.stop_stream.push(self.decoder.flush())
        return tail if hit else tail + self.stop_stream.flush()

    def _logprob(self, token: int, chunk: ChunkOutput, k: int, row: int) -> TokenLogprob | None:
        assert chunk.tokens_KB[k, row] == token
        assert chunk.top_ids_KBA.shape[2] >= (self.request.num_logprobs or 0)
        if self.request.num_logprobs is None:
            return None
        top = []
        for alt, value in zip(chunk.top_ids_KBA[k, row], chunk.top_logprobs_KBA[k, row]):
            if len(top) < self.request.num_logprobs and np.isfinite(value):  # filtered tokens have -inf
                top.append((int(alt), self._text(int(alt)), float(value)))
        return TokenLogprob(token, self._text(token), float(chunk.logprob_KB[k, row]), tuple(top))

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


class Engine:
    """Continuous batching over max_batch slots; see the module docstring. No global state: two
    engines (say, in one test process) share only the jitted functions' compile caches."""

    def __init__(
        self, weights: GPT2Weights, config: GPT2Config, tokenizer, max_batch: int = 8, max_seq_len: int = 1024,
        max_queue: int = 64, chunk_steps: int = 4, kv_dtype=jnp.float32,
    ) -> None:  # fmt: skip
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("chunk_steps", chunk_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0; got {max_queue}")
        self.weights, self.config, self.tokenizer = weights, config, tokenizer
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.max_batch, self.max_queue, self.chunk_steps = max_batch, max_queue, chunk_steps
        self.context_length = min(max_seq_len, config.n_positions)
        self.buckets = serve_buckets(self.context_length)
        eos = [] if config.eos_token_id is None else [config.eos_token_id]
        self.eos_ids, self._eos_E = set(eos), np.asarray(eos, np.int32).reshape(-1)
        self._slots = empty_slots(config, max_batch, self.context_length, self.kv_dtype)
        self._rows: list[_Sequence | None] = [None] * max_batch
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the counters and flags below, shared with submitting threads
        self._num_queued = 0  # submitted and not yet in a slot (the bounded queue)
        self._accepting, self._stopping = True, False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        assert self.buckets[-1] == self.context_length
        assert self._eos_E.ndim == 1

    @property
    def num_active(self) -> int:
        return sum(seq is not None for seq in self._rows)

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def submit(self, requests: Sequence[SequenceRequest], deliver: Callable[[Event], None]) -> list[int]:
        """Queue sequences (all or none); returns their ids. Raises ValueError, QueueFull or EngineClosed."""
        assert len(requests) >= 1
        for request in requests:
            check_request(request, self.config.vocab_size, self.context_length)
        if len(requests) > self.max_queue:
            raise ValueError(f"at most {self.max_queue} sequences per request (prompts x n); got {len(requests)}")
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if self._num_queued + len(requests) > self.max_queue:
                raise QueueFull(f"{self._num_queued} sequences already wait for a slot (max_queue={self.max_queue})")
            self._num_queued += len(requests)
            sequences = [_Sequence(next(self._ids), r, deliver, self.tokenizer) for r in requests]
            for seq in sequences:
                self._inbox.put(("submit", seq))
        assert len(sequences) == len(requests)
        return [seq.seq_id for seq in sequences]

    def cancel(self, seq_ids: Sequence[int]) -> None:
        """Drop sequences (the client went away): a waiting one leaves the queue, a running one its slot."""
        for seq_id in seq_ids:
            self._inbox.put(("cancel", seq_id))

    def step(self) -> bool:
        """One scheduling round: read the inbox, admit waiting sequences, decode one chunk. True if busy."""
        self._read_inbox(block=False)
        self._admit_waiting()
        assert self.num_active > 0 or not self._waiting, "a sequence waits while a slot is free"
        if self.num_active > 0:
            self._run_chunk()
        assert len(self._rows) == self.max_batch
        return self.busy

    @property
    def busy(self) -> bool:
        return self.num_active > 0 or len(self._waiting) > 0

    def warm_up(self) -> None:
        """Compile everything load can reach: admit at every bucket, the chunk, release. Call while idle."""
        assert self.num_active == 0
        assert self._thread is None
        warm = SequenceRequest((0,), max_tokens=1)
        for bucket in self.buckets:
            ids_1T, start_1 = left_pad([[0]], bucket)
            self._admit_row(warm, 0, ids_1T, start_1)
        self._slots, _ = _decode_chunk_jit(self._slots, self._eos_E, self.weights, self.config, self.chunk_steps)
        self._release([0])
        jax.block_until_ready(self._slots)

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
                if not self.busy:
                    if self._stopping:
                        return
                    self._read_inbox(block=True)
                    continue
                self.step()
            except Exception:  # a failed round must not kill the server: fail its sequences, start clean
                log.exception("engine round failed; failing the sequences in flight")
                self._fail_all()

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
                self._fail_all()
        else:
            waiting = [seq for seq in self._waiting if seq.seq_id == payload]
            for seq in waiting:
                self._waiting.remove(seq)
                with self._lock:
                    self._num_queued -= 1
            rows = [row for row, seq in enumerate(self._rows) if seq is not None and seq.seq_id == payload]
            for row in rows:
                self._rows[row] = None
            if rows:
                self._release(rows)

    def _admit_waiting(self) -> None:
        while self._waiting and None in self._rows:
            seq = self._waiting.popleft()
            with self._lock:
                self._num_queued -= 1
            row = self._rows.index(None)
            prompt = seq.request.prompt_ids
            ids_1T, start_1 = left_pad([prompt], next(b for b in self.buckets if b >= len(prompt)))
            self._admit_row(seq.request, row, ids_1T, start_1)
            self._rows[row] = seq
        assert self._num_queued >= len(self._waiting)
        assert not self._waiting or None not in self._rows

    def _admit_row(self, request: SequenceRequest, row: int, ids_1T: np.ndarray, start_1: np.ndarray) -> None:
        assert 0 <= row < self.max_batch
        assert ids_1T.shape[1] in self.buckets
        keys_1 = np.asarray(jax.random.fold_in(jax.random.PRNGKey(request.seed), request.index))[None]
        self._slots = _admit_jit(
            self._slots, ids_1T, start_1, keys_1, np.int32(row), row_params([request]),
            np.int32(request.max_tokens), self.weights, self.config,
        )  # fmt: skip

    def _run_chunk(self) -> None:
        self._slots, outputs = _decode_chunk_jit(self._slots, self._eos_E, self.weights, self.config, self.chunk_steps)
        chunk = ChunkOutput(*jax.device_get(outputs))
        finished = []
        for row, seq in enumerate(self._rows):
            if seq is None:
                continue
            token_K = chunk.tokens_KB[chunk.emitted_KB[:, row], row].tolist()
            assert token_K, f"row {row} is running on the host but was done on the device"
            event = seq.take(token_K, chunk, row, self.eos_ids)
            if seq.finish_reason is not None:
                self._rows[row] = None
                finished.append(row)
            if event.token_ids or event.text or event.finish_reason:
                self._deliver(seq, event)
        if finished:  # eos and max_tokens are done on the device already; stop strings are not
            self._release(finished)
        assert all(self._rows[row] is None for row in finished)

    def _release(self, rows: list[int]) -> None:
        assert rows
        assert all(0 <= row < self.max_batch for row in rows)
        free_B = np.zeros((self.max_batch,), np.bool_)
        free_B[rows] = True
        self._slots = _release_jit(self._slots, free_B)

    def _deliver(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.deliver(event)
        except Exception:  # the receiver is gone (say, its event loop closed): free its slot
            log.warning("could not deliver to sequence %d; cancelling it", seq.seq_id, exc_info=True)
            if event.finish_reason is None:
                self.cancel([seq.seq_id])

    def _fail_all(self) -> None:
        sequences = [seq for seq in self._rows if seq is not None] + list(self._waiting)
        with self._lock:
            self._num_queued -= len(self._waiting)
        self._rows, self._waiting = [None] * self.max_batch, collections.deque()
        assert self._num_queued >= 0
        assert self.num_active == 0
        self._slots = empty_slots(self.config, self.max_batch, self.context_length, self.kv_dtype)
        for seq in sequences:
            self._deliver(seq, Event(seq.seq_id, (), "", None, "error"))
