"""OpenAI's logit_bias, frequency and presence penalties and vLLM's min_tokens / stop_token_ids /
ignore_eos, through `generate` (one jitted loop) and `stream_generate`: +100 forces a token, -100
bans greedy's pick, the penalties equal a reference computed here from transformers' logits with
OpenAI's definition, and min_tokens holds the end tokens back."""

import numpy as np
import pytest
import torch

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights
from jax_gpt2.generate import generate, generate_with_settings, stream_generate
from jax_gpt2.sampling import InvalidSetting, SamplingSettings

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processors")
    hf = random_hf_model(hf_config(**dict(TINY, n_positions=64)), std=0.3)
    save_safetensors(hf, folder)
    return hf, load_weights(folder), load_config(folder)


def reference_with_count_penalties(hf, prompt: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """Greedy decoding from transformers' logits with OpenAI's rule, written out here:
    logits[j] -= count[j] * frequency + (count[j] > 0) * presence, count over the generated tokens only."""
    ids, generated = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits_V = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        count_V = np.bincount(np.asarray(generated, np.int64), minlength=logits_V.shape[0]).astype(np.float64)
        token = int(np.argmax(logits_V - count_V * frequency - (count_V > 0) * presence))
        ids.append(token)
        generated.append(token)
    return generated


@pytest.mark.parametrize("frequency, presence", [(0.8, 0.0), (0.0, 1.5), (0.6, 0.9), (-0.5, 0.0)])
def test_count_penalties_equal_openais_definition_on_transformers_logits(model, frequency, presence):
    hf, weights, config = model
    ours = generate(PROMPTS, weights, config, max_new_tokens=16, frequency_penalty=frequency, presence_penalty=presence)
    reference = [reference_with_count_penalties(hf, prompt, 16, frequency, presence) for prompt in PROMPTS]
    assert ours == reference
    assert ours != generate(PROMPTS, weights, config, max_new_tokens=16), "the penalties change the output here"


def test_count_penalties_ignore_the_prompt(model):
    """A token the prompt repeats but the output has not made yet is not penalized (unlike repetition_penalty)."""
    hf, weights, config = model
    free = generate([[3]], weights, config, max_new_tokens=1)[0][0]
    prompt = [free] * 8 + [3]
    first = generate([prompt], weights, config, max_new_tokens=1)[0][0]
    assert generate([prompt], weights, config, max_new_tokens=1, presence_penalty=2.0, frequency_penalty=2.0)[0][0] == first


def test_logit_bias_of_100_forces_a_token(model):
    _, weights, config = model
    forced = 77
    out = generate(PROMPTS, weights, config, max_new_tokens=8, logit_bias={forced: 100.0}, temperature=1.0, seed=3)
    assert out == [[forced] * 8] * len(PROMPTS)


def test_logit_bias_of_minus_100_bans_greedys_pick(model):
    _, weights, config = model
    free = generate(PROMPTS, weights, config, max_new_tokens=8)
    for prompt, row in zip(PROMPTS, free):
        banned = row[0]
        out = generate([prompt], weights, config, max_new_tokens=8, logit_bias={banned: -100.0})[0]
        assert banned not in out
        assert out[0] != banned


def test_streaming_applies_the_same_processors(model):
    _, weights, config = model
    settings = dict(max_new_tokens=12, frequency_penalty=0.7, presence_penalty=0.4, logit_bias={9: 3.0, 4: -2.5})
    whole = generate(PROMPTS, weights, config, **settings)
    steps = list(stream_generate(PROMPTS, weights, config, chunk_steps=5, **settings))
    streamed = [[step[row] for step in steps if step[row] is not None] for row in range(len(PROMPTS))]
    assert streamed == whole


def test_min_tokens_holds_back_the_end_tokens(model):
    """An eos greedy would pick at step 2 is banned until min_tokens tokens are made; a stop token id
    ends a row like eos; ignore_eos runs past the eos."""
    _, weights, config = model
    free = generate([PROMPTS[0]], weights, config, max_new_tokens=12)[0]
    eos = free[2]
    assert generate([PROMPTS[0]], weights, config, max_new_tokens=12, eos_token_id=eos)[0] == free[:3]
    held = generate_with_settings([PROMPTS[0]], weights, config, SamplingSettings(max_new_tokens=12, min_tokens=6), eos)[0]
    assert eos not in held[:6]
    assert len(held) >= 6
    by_stop_id = generate_with_settings([PROMPTS[0]], weights, config, SamplingSettings(max_new_tokens=12, stop_token_ids=(eos,)), None)
    assert by_stop_id == [free[:3]]
    ignoring = generate_with_settings([PROMPTS[0]], weights, config, SamplingSettings(max_new_tokens=12, ignore_eos=True), eos)
    assert ignoring == [free]


@pytest.mark.parametrize(
    "field, value",
    [("logit_bias", ((5, 100.5),)), ("logit_bias", ((5, 1.0), (5, 2.0))), ("logit_bias", tuple((i, 1.0) for i in range(301))),
     ("frequency_penalty", 2.5), ("presence_penalty", -2.01), ("min_tokens", -1), ("stop_token_ids", (-3,))],
)  # fmt: skip
def test_out_of_range_settings_name_their_field(field, value):
    with pytest.raises(InvalidSetting) as error:
        SamplingSettings(**{field: value})
    assert error.value.field == field


def test_token_ids_outside_the_vocabulary_are_a_clear_error(model):
    _, weights, config = model
    with pytest.raises(ValueError, match="logit_bias"):
        generate([[1]], weights, config, max_new_tokens=2, logit_bias={config.vocab_size: 1.0})
