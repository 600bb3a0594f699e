"""Weight tiles live in memory that XLA uses as it is (no copy into an XLA buffer), aligned so that
Linux can move them onto 2 MiB pages, and load_weights(huge_pages=False) defers only that move."""

import gc
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
from jax_gpt2 import load_weights
from jax_gpt2.loader import collapse_weight_pages, packed_matrices
from jax_gpt2.pages import ALIGNMENT, HUGE_PAGE, advise_huge_pages, tile_array
from jax_gpt2.weights import pack_matrix, unpack_matrix

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.parametrize("shape, dtype", [((1, 3, 64), np.float32), ((36, 768, 64), np.float32),
                                          ((48, 768, 64), jnp.bfloat16), ((5, 7, 64), np.int8)])  # fmt: skip
def test_tile_array_is_aligned_for_xla_and_for_2_mib_pages_when_large(shape, dtype):
    array = tile_array(shape, dtype)
    assert array.shape == shape
    assert array.dtype == np.dtype(dtype)
    assert array.ctypes.data % ALIGNMENT == 0
    if array.nbytes >= 2 * HUGE_PAGE:
        assert array.ctypes.data % HUGE_PAGE == 0
    assert array.flags.c_contiguous
    assert array.flags.writeable


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="aliasing host memory is a CPU backend's")
def test_packed_tiles_are_the_memory_pack_matrix_wrote_and_outlive_it():
    w_IO = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
    array = tile_array((4, 300, 64), np.float32)
    array[:] = 1.5
    aliased = jax.device_put(array, may_alias=True)
    assert aliased.unsafe_buffer_pointer() == array.ctypes.data
    packed = pack_matrix(w_IO, jnp.float32)
    del array
    gc.collect()
    _ = [np.full((300, 256), 7.0, np.float32) for _ in range(64)]  # reuse freed memory if any was freed
    np.testing.assert_array_equal(np.asarray(aliased), 1.5)
    np.testing.assert_array_equal(np.asarray(unpack_matrix(packed)), w_IO)
    assert np.all(np.asarray(packed.tiles_GIC)[3, :, 200 - 3 * 64 :] == 0), "columns past O are zero"


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(platform.system() != "Linux" or jax.default_backend() != "cpu", reason="Linux's 2 MiB pages")
@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_a_large_packed_matrix_starts_on_small_pages_and_advise_moves_it_onto_2_mib_pages():
    packed = pack_matrix(np.ones((768, 3072), np.float32), jnp.float32)  # 9 MiB of tiles
    address = packed.tiles_GIC.unsafe_buffer_pointer()
    assert anon_huge_kib(address) == 0, "written on 4 KiB pages (no compaction wait while packing)"
    took = advise_huge_pages(packed.tiles_GIC)
    if not took:
        pytest.skip("MADV_COLLAPSE refused here (a Linux before 6.1, or no free 2 MiB page)")
    assert anon_huge_kib(address) >= 4 * 2048, "the whole 2 MiB pages of 9 MiB: at least four"
    np.testing.assert_array_equal(np.asarray(unpack_matrix(packed)), 1.0)


def test_weights_loaded_without_the_page_move_are_the_same_weights(tmp_path):
    config = checkpoints.hf_config(n_embd=256, n_inner=4096, n_layer=1, n_head=4, vocab_size=300, n_positions=32)
    folder = checkpoints.save_safetensors(checkpoints.random_hf_model(config, std=0.1), tmp_path)  # 4 MiB MLP matrices
    moved, deferred = load_weights(folder), load_weights(folder, huge_pages=False)
    assert moved.use_kernels == deferred.use_kernels
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(deferred), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert collapse_weight_pages(deferred) <= len(packed_matrices(deferred))
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(deferred), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
