"""The loader reads what transformers writes, and refuses anything else with an error that says why.

Checkpoints here are edited state dicts of the tiny model, written back as model.safetensors next
to its config.json, so each test changes exactly one thing.
"""

import json
import shutil
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

import checkpoints
from jax_gpt2 import GPT2Config, ModelNotFoundError, PRESETS, PackedMatrix, gpt2_forward, load_config, load_weights
from jax_gpt2.config import config_from_hf_dict
from jax_gpt2.loader import normalize_keys, read_state_dict, resolve_model_dir, weights_without_kernels


def state_of(checkpoint) -> dict[str, np.ndarray]:
    """A checkpoint's own parameters, keys as GPT2LMHeadModel names them (`transformer.` prefix)."""
    return {key: value.detach().numpy().copy() for key, value in checkpoint.hf_model.state_dict().items()}


def write_checkpoint(folder: Path, state: dict[str, np.ndarray], hf_config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    save_file(state, folder / "model.safetensors")
    return folder


def hf_config_of(checkpoint, **changes) -> dict:
    return {**json.loads((checkpoint.folder / "config.json").read_text()), **changes}


# --- keys and shapes -----------------------------------------------------------------------------


def test_missing_key_is_an_error_naming_it(tiny, tmp_path):
    state = state_of(tiny)
    del state["transformer.h.1.mlp.c_fc.bias"]
    folder = write_checkpoint(tmp_path, state, hf_config_of(tiny))
    with pytest.raises(ValueError, match=r"missing .*h\.1\.mlp\.c_fc\.bias"):
        load_weights(folder)


def test_wrong_shape_is_an_error_naming_key_and_both_shapes(tiny, tmp_path):
    state = state_of(tiny)
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:, :-1]
    folder = write_checkpoint(tmp_path, state, hf_config_of(tiny))
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight.*\(24, 71\).*\(24, 72\)"):
        load_weights(folder)


def test_unknown_extra_key_is_an_error_naming_it(tiny, tmp_path):
    state = {**state_of(tiny), "transformer.h.0.attn.rotary_freqs": np.zeros(4, np.float32)}
    folder = write_checkpoint(tmp_path, state, hf_config_of(tiny))
    with pytest.raises(ValueError, match=r"unknown.*h\.0\.attn\.rotary_freqs"):
        load_weights(folder)


def test_old_attention_mask_buffers_are_ignored(tiny, tmp_path):
    """transformers < 4.31 saved h.{i}.attn.bias (the causal mask) and attn.masked_bias with the weights."""
    P = tiny.config.n_positions
    state = state_of(tiny)
    for layer in range(tiny.config.n_layer):
        state[f"transformer.h.{layer}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
        state[f"transformer.h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    weights = load_weights(write_checkpoint(tmp_path, state, hf_config_of(tiny)), pack=False)
    np.testing.assert_array_equal(weights.blocks[0].qkv_w_DE, load_weights(tiny.folder, pack=False).blocks[0].qkv_w_DE)


@pytest.mark.parametrize("prefixed", [True, False], ids=["GPT2LMHeadModel-keys", "GPT2Model-keys"])
def test_prefixed_and_unprefixed_keys_load_the_same_weights(prefixed, tiny, tmp_path):
    state = state_of(tiny)
    if not prefixed:
        state = {key.removeprefix("transformer."): value for key, value in state.items()}
    weights = load_weights(write_checkpoint(tmp_path, state, hf_config_of(tiny)), pack=False)
    reference = load_weights(tiny.folder, pack=False)
    np.testing.assert_array_equal(weights.wte_VD, reference.wte_VD)
    np.testing.assert_array_equal(weights.blocks[-1].fc_w_DF, reference.blocks[-1].fc_w_DF)


def test_key_both_with_and_without_prefix_is_an_error(tiny):
    state = state_of(tiny)
    state["ln_f.weight"] = state["transformer.ln_f.weight"]
    with pytest.raises(ValueError, match="ln_f.weight"):
        normalize_keys(state)


def test_lm_head_is_tied_to_wte_when_absent(tiny, tmp_path):
    state = {key: value for key, value in state_of(tiny).items() if key != "lm_head.weight"}
    weights = load_weights(write_checkpoint(tmp_path, state, hf_config_of(tiny)), pack=False)
    assert weights.lm_head_VD is None
    ids_BT = tiny.random_ids(2, 8)
    expected_BTV = gpt2_forward(ids_BT, load_weights(tiny.folder, pack=False), tiny.config)
    np.testing.assert_array_equal(gpt2_forward(ids_BT, weights, tiny.config), expected_BTV)


def test_untied_lm_head_is_used_when_config_unties_it(build_checkpoint):
    untied = build_checkpoint("untied-lm-head")
    lm_head_VD = untied.hf_model.lm_head.weight.detach().numpy()
    assert not np.array_equal(lm_head_VD, untied.hf_model.transformer.wte.weight.detach().numpy())
    np.testing.assert_array_equal(load_weights(untied.folder, pack=False).lm_head_VD, lm_head_VD)


def test_untied_config_without_lm_head_is_an_error(build_checkpoint, tmp_path):
    untied = build_checkpoint("untied-lm-head")
    state = {key: value for key, value in state_of(untied).items() if key != "lm_head.weight"}
    folder = write_checkpoint(tmp_path, state, hf_config_of(untied))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_weights(folder)


def test_tied_config_with_a_distinct_stored_lm_head_loads_what_transformers_loads(
    tiny, tmp_path, assert_matches_transformers
):
    """A file whose lm_head differs from wte although config.json ties them: transformers 5 keeps
    the stored lm_head (with a warning); whatever it does, jax-gpt2 must give the same logits."""
    state = state_of(tiny)
    state["lm_head.weight"] = np.random.default_rng(1).normal(size=state["lm_head.weight"].shape).astype(np.float32)
    folder = write_checkpoint(tmp_path, state, hf_config_of(tiny))
    reference_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids_BT = tiny.random_ids(2, 8)
    logits_BTV = gpt2_forward(ids_BT, load_weights(folder), load_config(folder))
    assert_matches_transformers(logits_BTV, checkpoints.hf_logits(reference_model, ids_BT))


# --- files and folders ---------------------------------------------------------------------------


def test_missing_folder_is_a_model_not_found_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        load_weights(tmp_path / "no-such-model")


def test_model_not_found_is_a_file_not_found_error():
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_folder_without_weights_is_a_file_not_found_error(tiny, tmp_path):
    shutil.copy(tiny.folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_weights(tmp_path)


def test_folder_without_config_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


TRUNCATABLE = {
    "model.safetensors": checkpoints.save_safetensors,
    "pytorch_model.bin": checkpoints.save_torch_bin,
    "model.npz": checkpoints.save_npz,
}


@pytest.mark.parametrize("keep_fraction", [0.5, 0.0001], ids=["half", "first-bytes"])
@pytest.mark.parametrize("file_name", TRUNCATABLE)
def test_truncated_weights_file_is_a_value_error(file_name, keep_fraction, tiny, tmp_path):
    folder = TRUNCATABLE[file_name](tiny.hf_model, tmp_path)
    path = folder / file_name
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_dict(folder)


# --- config.json ---------------------------------------------------------------------------------


def test_unsupported_activation_is_an_error_naming_it(tiny, tmp_path):
    folder = write_checkpoint(tmp_path, state_of(tiny), hf_config_of(tiny, activation_function="mish"))
    with pytest.raises(ValueError, match="'mish'"):
        load_config(folder)


def test_cross_attention_is_an_error(tiny, tmp_path):
    folder = write_checkpoint(tmp_path, state_of(tiny), hf_config_of(tiny, add_cross_attention=True))
    with pytest.raises(ValueError, match="add_cross_attention"):
        load_config(folder)


def test_config_json_written_by_transformers_defaults_is_gpt2(tmp_path):
    transformers.GPT2Config().save_pretrained(tmp_path)
    assert load_config(tmp_path) == GPT2Config()


def test_default_config_is_the_gpt2_preset():
    assert GPT2Config() == PRESETS["gpt2"]


def test_default_config_has_transformers_default_shape():
    reference = transformers.GPT2Config()
    config = GPT2Config()
    assert (config.vocab_size, config.n_positions) == (reference.vocab_size, reference.n_positions)
    assert (config.n_embd, config.n_layer, config.n_head) == (reference.n_embd, reference.n_layer, reference.n_head)
    assert config.activation_function == reference.activation_function
    assert config.layer_norm_epsilon == reference.layer_norm_epsilon


# The published sizes of the released checkpoints (their config.json on the hub).
PUBLISHED_SIZES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
    "distilgpt2": (768, 6, 12),
}


@pytest.mark.parametrize("name", PUBLISHED_SIZES)
def test_preset_has_the_published_size(name):
    preset = PRESETS[name]
    assert (preset.n_embd, preset.n_layer, preset.n_head) == PUBLISHED_SIZES[name]
    assert (preset.vocab_size, preset.n_positions) == (50257, 1024)


def test_every_preset_has_a_published_size():
    assert set(PRESETS) == set(PUBLISHED_SIZES)


def test_config_from_hf_dict_reads_every_knob():
    hf = transformers.GPT2Config(
        n_inner=37,
        layer_norm_epsilon=1e-6,
        scale_attn_by_inverse_layer_idx=True,
        scale_attn_weights=False,
        tie_word_embeddings=False,
        activation_function="relu",
    ).to_diff_dict()
    config = config_from_hf_dict(hf)
    assert config.n_inner == 37
    assert config.layer_norm_epsilon == 1e-6
    assert config.scale_attn_by_inverse_layer_idx
    assert not config.scale_attn_weights
    assert not config.tie_word_embeddings
    assert config.activation_function == "relu"


# --- hub names -----------------------------------------------------------------------------------


def offline_with_empty_cache(monkeypatch, cache: Path) -> None:
    """As on a machine that never downloaded anything and has HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_hub_name_offline_fails_fast_and_asks_for_a_local_folder(monkeypatch, tmp_path):
    offline_with_empty_cache(monkeypatch, tmp_path / "hf-cache")
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="pass a local folder"):
        resolve_model_dir("openai-community/gpt2")
    assert time.monotonic() - started < 30


def test_unknown_hub_name_fails_fast_and_asks_for_a_local_folder(monkeypatch, tmp_path):
    """No offline flag: with a network the hub answers 'not found', without one the connection fails."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="pass a local folder"):
        resolve_model_dir("jax-gpt2-tests/no-such-model-anywhere")
    assert time.monotonic() - started < 30


# --- without the kernels: no slow path for narrow dtypes ------------------------------------------

MATRIX_KEYS = {"qkv_w_DE": "attn.c_attn", "attn_out_w_DD": "attn.c_proj", "fc_w_DF": "mlp.c_fc", "proj_w_FD": "mlp.c_proj"}


def rounded(w_IO: np.ndarray, dtype: str) -> np.ndarray:
    """The value each weight has in the narrow model, computed here apart from the library's packing:
    bf16 round-to-nearest-even, or int8 symmetric per output column (scale max |w| / 127)."""
    if dtype == "bfloat16":
        return w_IO.astype(ml_dtypes.bfloat16).astype(np.float32)
    scale_O = np.abs(w_IO).max(axis=0) / np.float32(127)
    scale_O[scale_O == 0] = 1
    return np.clip(np.rint(w_IO / scale_O), -127, 127) * scale_O


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_narrow_weights_without_kernels_are_widened_once_to_their_rounded_values(dtype, tiny):
    """XLA's CPU dot would widen a narrow matrix before every product (~1.6 GB/s): the loader widens
    it once instead, to the very values the kernels would read, and says so."""
    state = normalize_keys(read_state_dict(tiny.folder))
    with pytest.warns(UserWarning, match=f"{dtype} weights widened to float32 at load"):
        weights = load_weights(tiny.folder, dtype=dtype, pack=False)
    assert not weights.use_kernels
    for layer, block in enumerate(weights.blocks):
        for field, key in MATRIX_KEYS.items():
            w_IO = getattr(block, field)
            assert not isinstance(w_IO, PackedMatrix)
            assert w_IO.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(w_IO), rounded(state[f"h.{layer}.{key}.weight"], dtype))
        np.testing.assert_array_equal(np.asarray(block.qkv_b_E), state[f"h.{layer}.attn.c_attn.bias"])  # not rounded
    # The tied output projection is rounded like lm_head_DV would be; the embedding gather keeps wte.
    np.testing.assert_array_equal(np.asarray(weights.wte_VD), state["wte.weight"])
    np.testing.assert_array_equal(np.asarray(weights.lm_head_VD), rounded(state["wte.weight"].T, dtype).T)


def test_float32_without_kernels_loads_as_is_and_without_a_warning(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = load_weights(tiny.folder, pack=False)
    assert not weights.use_kernels
    assert weights.lm_head_VD is None  # tied: no second copy of wte
    assert weights.blocks[0].qkv_w_DE.dtype == jnp.float32


def test_on_an_accelerator_bf16_stays_bf16_and_int8_stays_packed_for_xla(tiny):
    """A GPU's own bf16 dot is fast, and int8 tiles dequantize inside the fused dot: nothing to widen."""
    float32 = load_weights(tiny.folder, pack=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = weights_without_kernels(float32, jnp.dtype(jnp.bfloat16), "gpu")
        int8 = weights_without_kernels(float32, jnp.dtype(jnp.int8), "gpu")
    assert bf16.blocks[0].fc_w_DF.dtype == jnp.bfloat16
    assert bf16.wte_VD.dtype == jnp.bfloat16
    assert isinstance(int8.blocks[0].fc_w_DF, PackedMatrix)
    assert int8.blocks[0].fc_w_DF.dtype == jnp.int8
    assert not bf16.use_kernels
    assert not int8.use_kernels
