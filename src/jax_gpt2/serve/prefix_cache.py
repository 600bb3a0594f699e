"""The prefix cache: keys and values of prompt prefixes the engine has computed, kept in whole blocks so
a later prompt that starts with the same tokens copies them instead of computing them again; and,
for a block that a scoring request computed, the prompt logprobs of its tokens, so a later scoring
request that shares the block (an evaluation harness's choices after one context) need not compute
them again either."""

import collections
from collections.abc import Sequence

import jax
import numpy as np

from jax_gpt2.serve.slots import PREFIX_BLOCK

# A block's prompt logprobs: (logprob_T, top_ids_TA, top_logprobs_TA) of its tokens' entries, in the
# layout of a prefill chunk's outputs. Token j's entry comes from position j - 1, so block i holds the
# positions [i * PREFIX_BLOCK - 1, (i + 1) * PREFIX_BLOCK - 1): PREFIX_BLOCK of them, PREFIX_BLOCK - 1
# for block 0 (a prompt's first token has no entry). Each is fixed by the block's key (the tokens up
# to the block's end), never by a token after it.
Scores = tuple[np.ndarray, np.ndarray, np.ndarray]


def score_positions(block: int) -> tuple[int, int]:
    """[first, end): the positions whose outputs are block `block`'s scores."""
    assert block >= 0
    return max(block * PREFIX_BLOCK - 1, 0), (block + 1) * PREFIX_BLOCK - 1


class PrefixCache:
    """Keys and values of prompt prefixes in whole blocks of PREFIX_BLOCK tokens, least recently used
    out first, at most `capacity` blocks. Block i of a prompt is keyed by all of the prompt's first
    (i + 1) * PREFIX_BLOCK tokens: keys and values depend on every earlier token and on position,
    so a block is reused only after exactly the same tokens. A chain is touched deepest block
    first, so an ancestor is always more recent than its descendants and is evicted after them.
    A block may also hold its Scores (`add_scores`), evicted with it."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= 0
        self.capacity = capacity
        self.blocks: collections.OrderedDict[tuple[int, ...], tuple[jax.Array, jax.Array]] = collections.OrderedDict()
        self.scores: dict[tuple[int, ...], Scores] = {}

    @staticmethod
    def keys(prompt: Sequence[int], num_tokens: int) -> list[tuple[int, ...]]:
        """The keys of the whole blocks in the first num_tokens tokens of the prompt."""
        assert num_tokens <= len(prompt)
        return [tuple(prompt[: (i + 1) * PREFIX_BLOCK]) for i in range(num_tokens // PREFIX_BLOCK)]

    def _run(self, prompt: Sequence[int], max_tokens: int, scored: bool) -> list[tuple[int, ...]]:
        found = []
        for key in self.keys(prompt, max_tokens):
            if key not in self.blocks or (scored and key not in self.scores):
                break
            found.append(key)
        return found

    def match(self, prompt: Sequence[int], max_tokens: int) -> list[tuple[jax.Array, jax.Array]]:
        """The longest run of cached blocks the prompt starts with, covering at most max_tokens tokens."""
        found = self._run(prompt, max_tokens, scored=False)
        self.use(found)
        return [self.blocks[key] for key in found]

    def num_scored(self, prompt: Sequence[int], max_tokens: int) -> int:
        """How many blocks `match_scored` would return; touches nothing."""
        return len(self._run(prompt, max_tokens, scored=True))

    def match_scored(self, prompt: Sequence[int], max_tokens: int) -> list[tuple[jax.Array, jax.Array, Scores]]:
        """As `match`, the run ending at the first block that has no Scores: (k, v, scores) each."""
        found = self._run(prompt, max_tokens, scored=True)
        self.use(found)
        return [(*self.blocks[key], self.scores[key]) for key in found]

    def add(self, key: tuple[int, ...], block: tuple[jax.Array, jax.Array]) -> None:
        assert len(key) % PREFIX_BLOCK == 0
        assert key not in self.blocks
        self.blocks[key] = block
        while len(self.blocks) > self.capacity:
            evicted, _ = self.blocks.popitem(last=False)
            self.scores.pop(evicted, None)

    def add_scores(self, key: tuple[int, ...], scores: Scores) -> None:
        """The prompt logprobs of a cached block's tokens (score_positions of its index)."""
        assert key in self.blocks
        first, end = score_positions(len(key) // PREFIX_BLOCK - 1)
        assert all(part.shape[0] == end - first for part in scores), "one entry a position"
        self.scores[key] = scores

    def use(self, chain: list[tuple[int, ...]]) -> None:
        for key in reversed(chain):
            if key in self.blocks:
                self.blocks.move_to_end(key)
