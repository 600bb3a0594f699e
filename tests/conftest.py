"""Shared fixtures: random-weight checkpoints written by transformers, built once per session.

A `Checkpoint` is the reference `transformers.GPT2LMHeadModel`, the folder it was saved to as
model.safetensors, and the GPT2Config / GPT2Weights that jax-gpt2 loads back from that folder.
`SHAPES` names every model the parity tests run: the tiny default, one variant per config knob
that changes the computation, the real gpt2 shape and (slow) the gpt2-medium shape.

The parity bar is `checkpoints.logit_tolerance`; `assert_matches_transformers` applies it and
records each comparison's max difference, printed in the terminal summary.
"""

import dataclasses
import gc

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

import checkpoints
from jax_gpt2 import GPT2Config, GPT2Weights, load_config, load_weights
from jax_gpt2.config import SUPPORTED_ACTIVATIONS

# XLA on CPU already multiplies float32 at full precision; on GPU its default is TF32 (10-bit
# mantissa), which alone would miss the parity bar.
jax.config.update("jax_default_matmul_precision", "highest")

# name -> (transformers config overrides, std of the random weights). The std is large enough that
# the logits are peaked (a wrong op moves the argmax) and small enough that they stay finite through
# every layer; test_reference_logits_are_peaked guards the first.
SHAPES: dict[str, tuple[dict, float]] = {
    "tiny": (checkpoints.TINY, 0.3),
    "one-layer": ({**checkpoints.TINY, "n_layer": 1}, 0.3),
    "three-heads-of-width-7": ({**checkpoints.TINY, "n_embd": 21, "n_head": 3}, 0.3),
    "odd-n-inner": ({**checkpoints.TINY, "n_inner": 37}, 0.3),
    "layer-norm-eps-1e-6": ({**checkpoints.TINY, "layer_norm_epsilon": 1e-6}, 0.3),
    # With unit-scale activations an eps of 1e-6 vs 1e-5 moves the logits less than the tolerance;
    # a large eps makes a dropped or misplaced eps visible.
    "layer-norm-eps-0.5": ({**checkpoints.TINY, "layer_norm_epsilon": 0.5}, 0.3),
    "scale-attn-by-inverse-layer-idx": (
        {**checkpoints.TINY, "n_layer": 3, "scale_attn_by_inverse_layer_idx": True},
        0.3,
    ),
    "unscaled-attn-weights": ({**checkpoints.TINY, "scale_attn_weights": False}, 0.3),
    # transformers honours reorder_and_upcast_attn only in its eager attention.
    "reorder-and-upcast-attn": (
        {**checkpoints.TINY, "reorder_and_upcast_attn": True, "attn_implementation": "eager"},
        0.3,
    ),
    "untied-lm-head": ({**checkpoints.TINY, "tie_word_embeddings": False}, 0.3),
    **{
        f"activation-{name}": ({**checkpoints.TINY, "activation_function": name}, 0.3)
        for name in SUPPORTED_ACTIVATIONS
        if name != "gelu_new"  # the default: every other shape runs it
    },
    "gpt2": ({}, 0.1),
    "gpt2-medium": ({"n_embd": 1024, "n_layer": 24, "n_head": 16}, 0.1),
}
SLOW_SHAPES = {"gpt2-medium"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    folder: Path
    hf_model: transformers.GPT2LMHeadModel
    config: GPT2Config
    weights: GPT2Weights

    def random_ids(self, B: int, T: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.config.vocab_size, (B, T))


@pytest.fixture(scope="session")
def build_checkpoint(tmp_path_factory) -> Callable[[str], Checkpoint]:
    """Build (once per session) the checkpoint SHAPES names, save it, and load it back."""
    built: dict[str, Checkpoint] = {}

    def build(name: str) -> Checkpoint:
        if name not in built:
            overrides, std = SHAPES[name]
            hf_model = checkpoints.random_hf_model(checkpoints.hf_config(**overrides), std)
            folder = checkpoints.save_safetensors(hf_model, tmp_path_factory.mktemp(name))
            built[name] = Checkpoint(name, folder, hf_model, load_config(folder), load_weights(folder))
        return built[name]

    return build


@pytest.fixture(scope="session")
def tiny(build_checkpoint) -> Checkpoint:
    return build_checkpoint("tiny")


@pytest.fixture(scope="session")
def gpt2_shape(build_checkpoint) -> Checkpoint:
    return build_checkpoint("gpt2")


def shape_params(names) -> list:
    """pytest params for these SHAPES names, the slow ones marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SHAPES else name for name in names]


@pytest.fixture(scope="session", params=shape_params(SHAPES))
def any_shape(request, build_checkpoint) -> Checkpoint:
    return build_checkpoint(request.param)


@pytest.fixture(scope="module", autouse=True)
def free_compiled_programs_after_each_module():
    """Drop every compiled XLA program once a module is done.

    XLA on CPU maps each program's machine code as a few memory areas of their own, and the suite
    compiles thousands of programs: in one process they passed Linux's vm.max_map_count (65530) in
    test_serve, where the next mmap failed and the process died with a segfault (2026-12-06: 60k
    areas and 13.7 GB resident at 84% of the suite). A later module that needs a program compiles
    it again.
    """
    yield
    jax.clear_caches()
    gc.collect()


_MAX_DIFFS = pytest.StashKey[dict[str, tuple[float, float]]]()


def pytest_configure(config) -> None:
    config.stash[_MAX_DIFFS] = {}


# Modules whose tests start processes or servers, build every kernel ISA, or sweep many shapes: the
# bulk of the suite's time. `uv run pytest -m "not slow"` leaves them out for a quick run while
# working; CI (.ci/run) runs everything.
SLOW_MODULES = {
    "test_bench", "test_engine", "test_kernel_core", "test_kernels", "test_native", "test_remote", "test_serve",
    "test_serve_speculate", "test_sharding", "test_speculate",
}  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def assert_matches_transformers(request) -> Callable[..., None]:
    """The parity contract: max |actual - reference| <= logit_tolerance(reference), argmax identical.

    Pass check_argmax=False for hidden states, where the argmax means nothing. `what` names the
    compared quantity in the failure message and in the summary of max differences.
    """

    def check(actual, reference, what: str = "logits", check_argmax: bool = True) -> None:
        actual = np.asarray(actual)
        reference = np.asarray(reference)
        assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != reference {reference.shape}"
        assert np.isfinite(reference).all(), f"{what}: the reference itself is not finite"
        diff = float(np.abs(actual - reference).max())
        tolerance = checkpoints.logit_tolerance(reference)
        request.config.stash[_MAX_DIFFS][f"{request.node.name} {what}"] = (diff, tolerance)
        assert diff <= tolerance, f"{what}: max abs diff {diff:.3g} > tolerance {tolerance:.3g}"
        if check_argmax:
            mismatched = np.argwhere(actual.argmax(-1) != reference.argmax(-1))
            assert mismatched.size == 0, f"{what}: argmax differs at (row, position) {mismatched[:5].tolist()}"

    return check


def pytest_terminal_summary(terminalreporter, config) -> None:
    diffs = config.stash.get(_MAX_DIFFS, {})
    if not diffs:
        return
    terminalreporter.section("max abs diff vs reference (tolerance)")
    for name, (diff, tolerance) in diffs.items():
        terminalreporter.write_line(f"{diff:10.3g}  ({tolerance:.3g})  {name}")
