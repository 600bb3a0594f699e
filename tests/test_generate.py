"""Generation: token-for-token parity with transformers' greedy generate, ragged batches that
equal each prompt alone, eos per row, streaming equal to the one-shot call, seeds, argument
checks, and no recompilation for a new prompt length inside a known bucket."""

import pytest
import torch

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights
from jax_gpt2.generate import _generate_jit, bucket_length, generate, stream_generate

CONFIGS = {
    "tiny": dict(TINY, n_positions=64),
    "odd-relu": dict(TINY, n_positions=64, n_layer=1, n_head=2, n_embd=18, n_inner=50, activation_function="relu"),
    "inverse-layer-scale": dict(TINY, n_positions=64, n_layer=3, scale_attn_by_inverse_layer_idx=True),
}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 9, 9, 9, 9]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    """(transformers model, jax weights, jax config) for one random-weight checkpoint."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(hf_config(**CONFIGS[request.param]), std=0.3)
    save_safetensors(hf, folder)
    return hf, load_weights(folder), load_config(folder)


def hf_greedy(hf, prompt, max_new_tokens, eos_token_id=None, repetition_penalty=None):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            eos_token_id=eos_token_id, repetition_penalty=repetition_penalty,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_for_each_prompt_alone(model):
    hf, weights, config = model
    for prompt in PROMPTS:
        assert generate([prompt], weights, config, max_new_tokens=24) == [hf_greedy(hf, prompt, 24)]


def test_ragged_batch_rows_equal_each_prompt_run_alone_in_transformers(model):
    hf, weights, config = model
    batched = generate(PROMPTS, weights, config, max_new_tokens=24)
    assert batched == [hf_greedy(hf, prompt, 24) for prompt in PROMPTS]


def test_greedy_with_repetition_penalty_matches_transformers(model):
    hf, weights, config = model
    ours = generate(PROMPTS, weights, config, max_new_tokens=16, repetition_penalty=1.7)
    assert ours == [hf_greedy(hf, prompt, 16, repetition_penalty=1.7) for prompt in PROMPTS]


def test_each_row_stops_at_its_own_eos(model):
    hf, weights, config = model
    free_run = generate(PROMPTS, weights, config, max_new_tokens=24)
    eos = free_run[0][3]  # a token row 0 emits at step 3: that row must stop there
    stopped = generate(PROMPTS, weights, config, max_new_tokens=24, eos_token_id=eos)
    for row, prompt in enumerate(PROMPTS):
        assert stopped[row] == hf_greedy(hf, prompt, 24, eos_token_id=eos)
        if eos in free_run[row]:
            assert stopped[row] == free_run[row][: free_run[row].index(eos) + 1]
        else:
            assert stopped[row] == free_run[row]
    assert len(stopped[0]) <= 4


def test_eos_may_be_a_list(model):
    _, weights, config = model
    free_run = generate([PROMPTS[0]], weights, config, max_new_tokens=24)[0]
    first, second = free_run[5], free_run[2]
    stopped = generate([PROMPTS[0]], weights, config, max_new_tokens=24, eos_token_id=[first, second])[0]
    assert stopped == free_run[: min(free_run.index(first), free_run.index(second)) + 1]


@pytest.mark.parametrize("chunk_steps", [1, 3, 8])
def test_streaming_yields_the_same_tokens_as_generate(model, chunk_steps):
    _, weights, config = model
    settings = dict(max_new_tokens=13, temperature=0.8, top_k=20, seed=3)
    expected = generate(PROMPTS, weights, config, **settings)
    streamed = [[] for _ in PROMPTS]
    for step in stream_generate(PROMPTS, weights, config, chunk_steps=chunk_steps, **settings):
        assert len(step) == len(PROMPTS)
        for row, token in enumerate(step):
            if token is not None:
                streamed[row].append(token)
    assert streamed == expected


def test_streaming_stops_rows_at_eos_and_ends_when_all_are_done(model):
    _, weights, config = model
    eos = generate([PROMPTS[1]], weights, config, max_new_tokens=24)[0][2]
    steps = list(stream_generate([PROMPTS[1]], weights, config, max_new_tokens=24, eos_token_id=eos))
    assert [step[0] for step in steps][-1] == eos
    assert len(steps) <= 3


def test_top_k_1_and_a_tiny_top_p_are_greedy(model):
    _, weights, config = model
    greedy = generate(PROMPTS, weights, config, max_new_tokens=12)
    assert generate(PROMPTS, weights, config, max_new_tokens=12, temperature=1.5, top_k=1, seed=7) == greedy
    assert generate(PROMPTS, weights, config, max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=7) == greedy


def test_same_seed_same_output_and_different_seeds_differ(model):
    _, weights, config = model
    settings = dict(max_new_tokens=20, temperature=1.0)
    first = generate(PROMPTS, weights, config, seed=11, **settings)
    assert generate(PROMPTS, weights, config, seed=11, **settings) == first
    assert generate(PROMPTS, weights, config, seed=12, **settings) != first


def test_a_sampled_row_is_the_same_alone_or_in_a_batch(model):
    _, weights, config = model
    settings = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5)
    batched = generate(PROMPTS, weights, config, **settings)
    assert generate(PROMPTS[:1], weights, config, **settings) == batched[:1]


def test_a_new_prompt_length_inside_a_known_bucket_does_not_recompile(model):
    _, weights, config = model
    generate([[1, 2, 3]], weights, config, max_new_tokens=5)
    compiled = _generate_jit._cache_size()
    assert bucket_length(3) == bucket_length(7)
    generate([[4, 5, 6, 7, 8, 9, 10]], weights, config, max_new_tokens=6)
    generate([[11, 12, 13, 14]], weights, config, max_new_tokens=7)
    assert _generate_jit._cache_size() == compiled


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(seed=2**32), "seed"),
        (dict(eos_token_id=10_000), "eos_token_id"),
    ],
)
def test_bad_arguments_raise_value_errors_that_name_them(model, arguments, message):
    _, weights, config = model
    with pytest.raises(ValueError, match=message):
        generate([[1, 2, 3]], weights, config, **{"max_new_tokens": 4, **arguments})


def test_zero_new_tokens_make_nothing_after_the_same_checks(model):
    _, weights, config = model
    assert generate(PROMPTS, weights, config, max_new_tokens=0) == [[], [], [], []]
    assert list(stream_generate(PROMPTS, weights, config, max_new_tokens=0)) == []
    with pytest.raises(ValueError, match="outside"):
        generate([[1, config.vocab_size]], weights, config, max_new_tokens=0)


def test_bad_prompts_raise_value_errors(model):
    _, weights, config = model
    with pytest.raises(ValueError, match="empty"):
        generate([[1, 2], []], weights, config, max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        generate([], weights, config, max_new_tokens=4)
    with pytest.raises(ValueError, match="outside"):
        generate([[1, config.vocab_size]], weights, config, max_new_tokens=4)
    with pytest.raises(ValueError, match="n_positions"):
        generate([[1] * 60], weights, config, max_new_tokens=5)  # 65 positions > 64; never silently truncated


def test_bucket_lengths_are_powers_of_two_then_multiples_of_64():
    assert [bucket_length(n) for n in (1, 8, 9, 33, 64, 65, 130, 1000)] == [8, 8, 16, 64, 64, 128, 192, 1024]
