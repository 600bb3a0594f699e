"""The prefix cache: keys and values of prompt prefixes the engine has computed, kept in whole blocks so
a later prompt that starts with the same tokens copies them instead of computing them again."""

import collections
from collections.abc import Sequence

import jax

from jax_gpt2.serve.slots import PREFIX_BLOCK


class PrefixCache:
    """Keys and values of prompt prefixes in whole blocks of PREFIX_BLOCK tokens, least recently used
    out first, at most `capacity` blocks. Block i of a prompt is keyed by all of the prompt's first
    (i + 1) * PREFIX_BLOCK tokens: keys and values depend on every earlier token and on position,
    so a block is reused only after exactly the same tokens. A chain is touched deepest block
    first, so an ancestor is always more recent than its descendants and is evicted after them."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= 0
        self.capacity = capacity
        self.blocks: collections.OrderedDict[tuple[int, ...], tuple[jax.Array, jax.Array]] = collections.OrderedDict()

    @staticmethod
    def keys(prompt: Sequence[int], num_tokens: int) -> list[tuple[int, ...]]:
        """The keys of the whole blocks in the first num_tokens tokens of the prompt."""
        assert num_tokens <= len(prompt)
        return [tuple(prompt[: (i + 1) * PREFIX_BLOCK]) for i in range(num_tokens // PREFIX_BLOCK)]

    def match(self, prompt: Sequence[int], max_tokens: int) -> list[tuple[jax.Array, jax.Array]]:
        """The longest run of cached blocks the prompt starts with, covering at most max_tokens tokens."""
        found = []
        for key in self.keys(prompt, max_tokens):
            if key not in self.blocks:
                break
            found.append(key)
        self.use(found)
        return [self.blocks[key] for key in found]

    def add(self, key: tuple[int, ...], block: tuple[jax.Array, jax.Array]) -> None:
        assert len(key) % PREFIX_BLOCK == 0
        assert key not in self.blocks
        self.blocks[key] = block
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def use(self, chain: list[tuple[int, ...]]) -> None:
        for key in reversed(chain):
            if key in self.blocks:
                self.blocks.move_to_end(key)
