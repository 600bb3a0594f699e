"""GPT2Config reads config.json values of any JSON type: each field's type is checked, by name."""

import numpy as np
import pytest

from jax_gpt2.config import GPT2Config, config_from_file, config_from_hf_dict


@pytest.mark.parametrize(("changes", "expected"), [
    ({"n_layer": "2"}, 'config.n_layer must be an integer; got "2" (str)'),
    ({"n_layer": 2.0}, "config.n_layer must be an integer; got 2.0 (float)"),
    ({"n_head": False}, "config.n_head must be an integer; got false (bool)"),
    ({"n_inner": 3.5}, "config.n_inner must be an integer or null; got 3.5 (float)"),
    ({"eos_token_id": [0, 1]}, "config.eos_token_id must be an integer or null; got [0, 1] (list)"),
    ({"layer_norm_epsilon": "1e-5"}, 'config.layer_norm_epsilon must be a number; got "1e-5" (str)'),
    ({"layer_norm_epsilon": True}, "config.layer_norm_epsilon must be a number; got true (bool)"),
    ({"scale_attn_weights": 1}, "config.scale_attn_weights must be true or false; got 1 (int)"),
    ({"tie_word_embeddings": "false"}, 'config.tie_word_embeddings must be true or false; got "false" (str)'),
    ({"activation_function": None}, "config.activation_function must be a string; got null (NoneType)"),
])  # fmt: skip
def test_a_value_of_the_wrong_type_is_a_value_error_naming_the_key(changes, expected):
    with pytest.raises(ValueError) as error:
        config_from_hf_dict({"model_type": "gpt2", **changes})
    assert str(error.value) == expected


def test_values_of_the_declared_types_are_accepted():
    config = config_from_hf_dict({
        "n_layer": 2, "layer_norm_epsilon": 1, "n_inner": None, "eos_token_id": None, "scale_attn_weights": False,
    })  # fmt: skip
    assert (config.n_layer, config.layer_norm_epsilon, config.n_inner) == (2, 1, None)
    assert config.eos_token_id is None
    assert config.scale_attn_weights is False


def test_numpy_scalars_count_as_numbers():
    config = GPT2Config(n_layer=np.int64(3), layer_norm_epsilon=np.float32(1e-6))
    assert config.n_layer == 3
    assert config.layer_norm_epsilon == np.float32(1e-6)


def test_a_config_json_that_is_not_utf8_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"n_layer": 2, "\xff": 1}')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        config_from_file(path)
