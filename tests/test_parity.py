"""jax-gpt2 computes what transformers computes: the project's contract.

Tolerance, everywhere in this file: `checkpoints.logit_tolerance(reference)`, 1e-4 absolute scaled
by the reference's magnitude above 1, plus an identical argmax for logits. The reason: the two
sides agree on every op and differ only in float32 summation order (XLA vs. torch kernels); both
sit about 1e-4 from a float64 reference on the gpt2 shape, so a tighter bar would test rounding
and a looser one would hide a wrong op (random large-std weights make the logits peaked, so a
wrong op moves them by far more, and moves the argmax).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import checkpoints
from jax_gpt2 import block_hidden_states, empty_cache, gpt2_forward, gpt2_forward_cached, load_config, load_weights

B_DEFAULT = 2
T_DEFAULT = 16  # tiny models: half their n_positions
T_GPT2 = 64


def default_length(checkpoint) -> int:
    return T_DEFAULT if checkpoint.config.n_positions <= 2 * T_DEFAULT else T_GPT2


def test_logits_match_transformers(any_shape, assert_matches_transformers):
    ids_BT = any_shape.random_ids(B_DEFAULT, default_length(any_shape))
    logits_BTV = gpt2_forward(ids_BT, any_shape.weights, any_shape.config)
    assert_matches_transformers(logits_BTV, checkpoints.hf_logits(any_shape.hf_model, ids_BT))


def test_reference_logits_are_peaked(any_shape):
    """Guards the test models themselves: near-uniform logits would let a wrong op keep the argmax."""
    ids_BT = any_shape.random_ids(B_DEFAULT, default_length(any_shape))
    probs_BTV = torch.softmax(torch.as_tensor(checkpoints.hf_logits(any_shape.hf_model, ids_BT)), dim=-1)
    uniform = 1.0 / any_shape.config.vocab_size
    assert float(probs_BTV.max(-1).values.median()) > 5 * uniform


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_single_token_matches_transformers(name, build_checkpoint, assert_matches_transformers):
    checkpoint = build_checkpoint(name)
    ids_BT = checkpoint.random_ids(B_DEFAULT, 1)
    logits_BTV = gpt2_forward(ids_BT, checkpoint.weights, checkpoint.config)
    assert_matches_transformers(logits_BTV, checkpoints.hf_logits(checkpoint.hf_model, ids_BT))


@pytest.mark.parametrize(("name", "B"), [("tiny", 2), ("gpt2", 1)])
def test_full_context_matches_transformers(name, B, build_checkpoint, assert_matches_transformers):
    checkpoint = build_checkpoint(name)
    ids_BT = checkpoint.random_ids(B, checkpoint.config.n_positions)
    logits_BTV = gpt2_forward(ids_BT, checkpoint.weights, checkpoint.config)
    assert_matches_transformers(logits_BTV, checkpoints.hf_logits(checkpoint.hf_model, ids_BT))


def hf_block_outputs(hf_model, ids_BT: np.ndarray) -> list[np.ndarray]:
    """The residual stream after each transformers block, captured with forward hooks."""
    outputs = []

    def capture(module, args, output):
        # A block returns a tensor in transformers 5, a tuple (hidden, ...) in 4.x.
        hidden = output[0] if isinstance(output, tuple) else output
        outputs.append(hidden.detach().float().numpy())

    hooks = [block.register_forward_hook(capture) for block in hf_model.transformer.h]
    try:
        checkpoints.hf_logits(hf_model, ids_BT)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) == len(hf_model.transformer.h)
    return outputs


HIDDEN_STATE_SHAPES = ["tiny", "scale-attn-by-inverse-layer-idx", "untied-lm-head", "gpt2"]


@pytest.mark.parametrize("name", HIDDEN_STATE_SHAPES)
def test_every_block_output_matches_transformers(name, build_checkpoint, assert_matches_transformers):
    checkpoint = build_checkpoint(name)
    ids_BT = checkpoint.random_ids(B_DEFAULT, default_length(checkpoint))
    ours = block_hidden_states(ids_BT, checkpoint.weights, checkpoint.config)
    theirs = hf_block_outputs(checkpoint.hf_model, ids_BT)
    assert len(ours) == checkpoint.config.n_layer
    for layer, (hidden_BTD, reference_BTD) in enumerate(zip(ours, theirs, strict=True)):
        assert_matches_transformers(hidden_BTD, reference_BTD, what=f"block {layer} output", check_argmax=False)


CACHED_SHAPES = ["tiny", "scale-attn-by-inverse-layer-idx", "untied-lm-head", "gpt2"]


@pytest.mark.parametrize("name", CACHED_SHAPES)
def test_cached_decode_matches_full_forward(name, build_checkpoint, assert_matches_transformers):
    """Prefill half the sequence, then feed the rest one token at a time into a cache with spare slots."""
    checkpoint = build_checkpoint(name)
    B, T = B_DEFAULT, default_length(checkpoint)
    ids_BT = checkpoint.random_ids(B, T)
    prefill = T // 2
    cache = empty_cache(checkpoint.config, jnp.zeros((B,), jnp.int32), max_len=T + 3)
    logits, cache = gpt2_forward_cached(ids_BT[:, :prefill], cache, checkpoint.weights, checkpoint.config)
    steps = [logits]
    for t in range(prefill, T):
        logits, cache = gpt2_forward_cached(ids_BT[:, t : t + 1], cache, checkpoint.weights, checkpoint.config)
        steps.append(logits)
    assert (np.asarray(cache.end_B) == T).all()
    full_BTV = gpt2_forward(ids_BT, checkpoint.weights, checkpoint.config)
    assert_matches_transformers(jnp.concatenate(steps, axis=1), full_BTV, what="cached logits")


def left_pad(prompts: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids_BT with each prompt right-aligned, and start_B, the slot of each prompt's first token."""
    T = max(len(prompt) for prompt in prompts)
    ids_BT = np.full((len(prompts), T), pad_id, np.int64)
    start_B = np.array([T - len(prompt) for prompt in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        ids_BT[row, start_B[row] :] = prompt
    return ids_BT, start_B


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_left_padded_rows_match_each_prompt_alone(name, build_checkpoint, assert_matches_transformers):
    """Prefill a left-padded batch, decode a few teacher-forced tokens; each row as if run by itself."""
    checkpoint = build_checkpoint(name)
    config, weights = checkpoint.config, checkpoint.weights
    lengths, decode_steps = [7, 2, 5], 3
    prompts = [checkpoint.random_ids(1, length, seed=row)[0] for row, length in enumerate(lengths)]
    continuations_BC = checkpoint.random_ids(len(prompts), decode_steps, seed=99)
    ids_BT, start_B = left_pad(prompts)
    cache = empty_cache(config, jnp.asarray(start_B), max_len=ids_BT.shape[1] + decode_steps)
    logits, cache = gpt2_forward_cached(ids_BT, cache, weights, config)
    steps = [logits]
    for step in range(decode_steps):
        logits, cache = gpt2_forward_cached(continuations_BC[:, step : step + 1], cache, weights, config)
        steps.append(logits)
    batched_BSV = np.asarray(jnp.concatenate(steps, axis=1))
    for row, prompt in enumerate(prompts):
        alone_ids_1T = np.concatenate([prompt, continuations_BC[row]])[None]
        alone_1TV = gpt2_forward(alone_ids_1T, weights, config)
        real_slots_1TV = batched_BSV[row : row + 1, start_B[row] :]
        assert_matches_transformers(real_slots_1TV, alone_1TV, what=f"row {row} (prompt of {len(prompt)})")


FORMATS = {
    "safetensors": checkpoints.save_safetensors,
    "sharded-safetensors": lambda model, folder: checkpoints.save_sharded(model, folder, max_shard_size="20KB"),
    "pytorch_model.bin": checkpoints.save_torch_bin,
    "model.npz": checkpoints.save_npz,
    "bare-GPT2Model": checkpoints.save_bare_gpt2model,
}


@pytest.mark.parametrize("format_name", FORMATS)
def test_every_checkpoint_format_gives_transformers_logits(format_name, tiny, tmp_path, assert_matches_transformers):
    folder = FORMATS[format_name](tiny.hf_model, tmp_path / format_name)
    config, weights = load_config(folder), load_weights(folder)
    ids_BT = tiny.random_ids(B_DEFAULT, T_DEFAULT)
    logits_BTV = gpt2_forward(ids_BT, weights, config)
    assert_matches_transformers(logits_BTV, checkpoints.hf_logits(tiny.hf_model, ids_BT))


def test_sharded_format_really_has_several_shards(tiny, tmp_path):
    """Guards the format test above: a max_shard_size too large would silently write one file."""
    folder = FORMATS["sharded-safetensors"](tiny.hf_model, tmp_path)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
