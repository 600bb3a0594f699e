"""The decode-attention rows every kernel test runs: one row per case the kernel treats apart."""

import numpy as np


def decode_rows(S: int) -> tuple[np.ndarray, np.ndarray]:
    """start_B, end_B (inclusive): every case the kernel treats apart, one row each."""
    rows = [
        (0, S - 1),  # the whole cache
        (min(3, S - 1), S - 1),  # left padding
        (S // 2, S // 2),  # one visible slot
        (min(2, S - 1), S + 4),  # end past the last slot: clamped, like XLA's dropped write
        (-3, S // 3),  # start before slot 0 (nothing to skip)
        (S // 2 + 1, S // 2),  # start > end: nothing visible
        (S, S + 2),  # starts past the cache: nothing visible
    ]
    start_B, end_B = np.array(rows, np.int32).T
    return start_B, end_B
