"""The engine's programs, compiled ahead of use: each one once, by whichever thread needs it first.

A server must not compile every program before it answers (a gpt2-shape engine has ~40 of them: a
minute on two cores). It compiles the few a first short request runs (`Programs.first`), says it is
ready, and compiles the rest on a background thread while it serves.

Why a background thread may compile while the engine thread runs programs on the slots: a job
compiles on abstract shapes (`jax.ShapeDtypeStruct`) through `jitted.lower(...).compile()`. It
reads no array and writes none, so it cannot race the engine's state; what it leaves behind is the
executable in JAX's own compile caches, which are safe to share between threads. On one device an
argument that carries no sharding is lowered exactly as a call with the engine's committed arrays
is (both lower with an unspecified sharding), so the engine's later call finds that executable and
neither traces nor compiles again (tests/test_engine.py checks this by counting XLA compiles).
Executing is left to the engine thread alone, so it stays the only one that touches the slots. (On
a mesh the state's shardings change as programs run, so abstract shapes taken at start would miss:
there the engine has no jobs and the server warms it up eagerly before its thread starts.)

A request that needs a program the background has not reached yet does not wait behind the queue:
the engine thread calls `ensure(key)` before each call, which compiles it at once, or, if the
background thread is compiling that very program, waits for it (one lock per program: never two
compiles of one program).
"""

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable, Sequence

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """One program to compile: its key (the jitted function's name and static arguments) and how."""

    key: Hashable
    compile: Callable[[], object]  # lowers and compiles on abstract arguments; runs nothing


class Programs:
    """Every program an engine can run, `first` the ones a short single request needs. `ready` is set
    once `first` are compiled, `warm` once all are (`compile` sets them; `mark_all_compiled` too)."""

    def __init__(self, jobs: Sequence[Job], first: Sequence[Hashable]) -> None:
        keys = [job.key for job in jobs]
        assert len(set(keys)) == len(keys), "one job per program"
        assert set(first) <= set(keys), "the first programs are among the jobs"
        self._jobs = {job.key: job for job in jobs}
        self._locks = {key: threading.Lock() for key in keys}
        self._compiled: set[Hashable] = set()  # grows only; a set's add and `in` are atomic under the GIL
        self.first = tuple(first)
        self.ready, self.warm = threading.Event(), threading.Event()
        self._claimed = False  # by claim_background, under _claim_lock
        self._claim_lock = threading.Lock()

    @property
    def keys(self) -> tuple[Hashable, ...]:
        return tuple(self._jobs)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def claim_background(self) -> bool:
        """True for the first caller only: the one that starts the background compile (a server may
        start it before its app exists, and the app's start-up must not start a second)."""
        with self._claim_lock:
            first, self._claimed = not self._claimed, True
        assert self._claimed
        return first

    def ensure(self, key: Hashable) -> None:
        """Compile `key` now unless it is compiled (a key with no job: the call compiles it itself).
        If another thread is compiling it, wait for that. A failed compile is logged and counted as
        done: the engine's own call then compiles it (and raises there, where a failure is handled)."""
        if key in self._compiled or key not in self._jobs:
            return
        with self._locks[key]:
            if key in self._compiled:
                return
            try:
                self._jobs[key].compile()
            except Exception:
                log.warning("compiling %s ahead of use failed; it compiles at its first call", key, exc_info=True)
            self._compiled.add(key)
        assert key in self._compiled

    def compile(self, keys: Sequence[Hashable], threads: int = 1) -> None:
        """Compile these programs (skipping compiled ones), in order on `threads` threads; set `ready` /
        `warm` when earned. XLA compiles one program on one core and lets go of the GIL meanwhile, so
        two threads compile two programs in about the time of the longer one."""
        assert all(key in self._jobs for key in keys)
        assert threads >= 1
        if threads == 1:
            for key in keys:
                self.ensure(key)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jax-gpt2-compile") as pool:
                list(pool.map(self.ensure, keys))
        if all(key in self._compiled for key in self.first):
            self.ready.set()
        if len(self._compiled) == len(self._jobs):
            self.warm.set()
        assert not self.warm.is_set() or self.ready.is_set()

    def compile_all(self) -> None:
        """`first`, then the rest in the jobs' order (the likeliest next needs first)."""
        self.compile(self.first)
        self.compile([key for key in self._jobs if key not in self.first])
        assert self.warm.is_set()
        assert self.ready.is_set()

    def mark_all_compiled(self) -> None:
        """Every program was compiled another way (the engine's eager `warm_up`)."""
        self._compiled.update(self._jobs)
        self.ready.set()
        self.warm.set()
        assert self.num_compiled == len(self._jobs)
