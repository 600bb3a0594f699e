"""Sliding-window perplexity: equal to a transformers reference that implements the definition
window by window, independent of batch size, compiled once per file, with clear errors, and the
`jax-gpt2 perplexity` command on a text file.

The definition: windows of at most max_length tokens begin every stride tokens; each token is
scored once, by the first window that holds it as a new target, with all the context that window
gives it; a window's first token has no context in it, so the text's first token is never scored.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights, perplexity
from jax_gpt2.cli import main
from jax_gpt2.kernels import kernels_available
from jax_gpt2.perplexity import plan_windows, scored_nll
from jax_gpt2.tools.random_model import train_tokenizer
from jax_gpt2.tokenizer import encode, load_tokenizer

# float32 forward passes on both sides; the NLL sums are float64. A relative 1e-5 on the perplexity
# is an absolute 1e-5 on the mean NLL: well above float32 rounding, far below any miscounted token.
RELATIVE_TOLERANCE = 1e-5
STD = 0.2  # peaked enough that a token scored with the wrong context changes the result


def reference_perplexity(model, ids: np.ndarray, max_length: int, stride: int) -> float:
    """The definition, written out with transformers' GPT2LMHeadModel, one window at a time."""
    nll_sum, num_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            logits_TV = model(torch.as_tensor(ids[None, begin:end], dtype=torch.long)).logits[0]
        logprobs_TV = torch.log_softmax(logits_TV.double(), dim=-1)
        for i in range(max(prev_end, begin + 1), end):  # new targets that have context in this window
            nll_sum -= float(logprobs_TV[i - begin - 1, ids[i]])
            num_scored += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / num_scored)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, config, weights) of one tiny random checkpoint, n_positions = 32."""
    folder = tmp_path_factory.mktemp("tiny-ppl")
    model = random_hf_model(hf_config(**TINY), std=STD)
    save_safetensors(model, folder)
    return model, load_config(folder), load_weights(folder)


def random_ids(num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], num_tokens)


@pytest.mark.parametrize(
    "num_tokens, max_length, stride",
    [
        (96, 16, 16),  # stride = max_length: disjoint windows
        (96, 16, 5),  # stride < max_length: overlapping windows, most targets masked
        (11, 16, 8),  # a text shorter than one window: one window
        (61, 16, 6),  # the last window is short
        (33, 16, 16),  # stride = max_length and a one-token last window, which scores nothing
    ],
)
def test_perplexity_matches_a_transformers_reference(tiny, num_tokens, max_length, stride):
    model, config, weights = tiny
    ids = random_ids(num_tokens)
    expected = reference_perplexity(model, ids, max_length, stride)
    got = perplexity(ids, weights, config, max_length=max_length, stride=stride, batch_size=3)
    assert abs(got - expected) <= RELATIVE_TOLERANCE * expected


def test_batch_size_does_not_change_the_result(tiny):
    _, config, weights = tiny
    ids = random_ids(70, seed=1)
    results = [perplexity(ids, weights, config, max_length=20, stride=7, batch_size=b) for b in (1, 2, 5, 64)]
    assert max(results) - min(results) <= RELATIVE_TOLERANCE * results[0]


@pytest.mark.skipif(not kernels_available(), reason="native kernels unavailable here")
def test_each_tokens_nll_is_the_same_by_the_kernels_log_sum_exp_as_by_xlas(tmp_path):
    """The kernels' log-sum-exp of each scored position's logits (with the kernels' matmuls) against
    XLA's (XLA's matmuls too, pack=False): per token, within float32 rounding of logits of this size."""
    save_safetensors(random_hf_model(hf_config(**TINY), std=STD), tmp_path)
    config = load_config(tmp_path)
    kernels, xla = load_weights(tmp_path), load_weights(tmp_path, pack=False)
    assert kernels.use_kernels
    assert not xla.use_kernels
    ids_BT = random_ids(64, seed=3).reshape(2, 32).astype(np.int32)
    positions_R = np.arange(62, dtype=np.int32)  # every position but the last of row 1 ...
    targets_R = np.concatenate([ids_BT[0, 1:], ids_BT[1, :1], ids_BT[1, 1:31]]).astype(np.int32)  # ... any target
    nll_kernels = np.asarray(scored_nll(ids_BT, positions_R, targets_R, kernels, config))
    nll_xla = np.asarray(scored_nll(ids_BT, positions_R, targets_R, xla, config))
    assert nll_kernels.shape == (62,)
    assert nll_kernels.min() > 0.0  # a random model: no token is certain
    np.testing.assert_allclose(nll_kernels, nll_xla, rtol=0, atol=1e-4 * max(1.0, float(np.abs(nll_xla).max())))


def test_each_token_after_the_first_is_scored_once_when_windows_overlap():
    windows = plan_windows(num_tokens=61, max_length=16, stride=6)
    scored = [i for window in windows for i in range(window.first_target, window.end)]
    assert scored == list(range(1, 61))
    assert all(window.end - window.begin <= 16 for window in windows)


def test_a_short_last_window_and_batch_compile_once(tiny):
    """64 tokens, windows of 13 every 6: 10 windows, the last 10 tokens long, in batches of 4, the last of 2."""
    _, config, weights = tiny
    windows = plan_windows(64, 13, 6)
    assert len(windows) % 4 != 0
    assert windows[-1].end - windows[-1].begin < 13
    before = scored_nll._cache_size()
    perplexity(random_ids(64, seed=2), weights, config, max_length=13, stride=6, batch_size=4)
    assert scored_nll._cache_size() == before + 1


@pytest.mark.parametrize(
    "num_tokens, max_length, stride, message",
    [
        (50, 16, 17, "stride=17 > max_length=16"),
        (50, 16, 0, "stride must be >= 1"),
        (50, 33, 8, "longer than the model's n_positions=32"),
        (1, 16, 8, "at least 2 tokens"),
        (0, 16, 8, "at least 2 tokens"),
    ],
)
def test_bad_settings_are_value_errors_that_say_why(tiny, num_tokens, max_length, stride, message):
    _, config, weights = tiny
    with pytest.raises(ValueError, match=message):
        perplexity(random_ids(num_tokens), weights, config, max_length=max_length, stride=stride)


TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and "
    "predicts the next one. Keys and values of earlier tokens are kept in a cache. Hello world! "
) * 3


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(model folder, text file): a tiny checkpoint with a byte-level BPE trained to its vocabulary size."""
    folder = tmp_path_factory.mktemp("tiny-ppl-cli")
    vocab_size = train_tokenizer(folder, 300)
    save_safetensors(random_hf_model(hf_config(**{**TINY, "vocab_size": vocab_size}), std=STD), folder)
    text_file = folder / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    return folder, text_file


CLI_SETTINGS = ["--max-length", "32", "--stride", "16", "--batch-size", "4"]


def library_perplexity(folder, kv_dtype=jnp.float32) -> tuple[float, int]:
    ids = encode(load_tokenizer(folder), TEXT)
    weights, config = load_weights(folder), load_config(folder)
    return perplexity(ids, weights, config, max_length=32, stride=16, batch_size=4, kv_dtype=kv_dtype), len(ids)


def test_cli_prints_perplexity_token_count_and_speed(text_model, capsys):
    folder, text_file = text_model
    assert main(["perplexity", str(text_file), "--model", str(folder), *CLI_SETTINGS]) == 0
    out = capsys.readouterr().out
    expected, num_tokens = library_perplexity(folder)
    assert f"perplexity: {expected:.4f}" in out
    assert f"tokens: {num_tokens}" in out
    assert "tokens/s" in out


def test_cli_json_is_one_machine_readable_line(text_model, capsys):
    folder, text_file = text_model
    assert main(["perplexity", str(text_file), "--model", str(folder), *CLI_SETTINGS, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    expected, num_tokens = library_perplexity(folder)
    assert abs(result["perplexity"] - expected) <= RELATIVE_TOLERANCE * expected
    assert result["tokens"] == num_tokens
    assert result["scored_tokens"] == num_tokens - 1
    assert result["tokens_per_second"] > 0


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_cli_narrow_weights_give_a_nearby_perplexity(dtype, text_model, capsys):
    """bf16 keeps ~3 significant digits per weight, per-channel int8 ~2: the mean NLL moves by well under 5%."""
    folder, text_file = text_model
    assert main(["perplexity", str(text_file), "--model", str(folder), *CLI_SETTINGS, "--dtype", dtype, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected, _ = library_perplexity(folder)
    assert result["dtype"] == dtype
    assert result["perplexity"] != expected  # the weights really were narrowed
    assert abs(math.log(result["perplexity"]) - math.log(expected)) <= 0.05 * math.log(expected)

def test_cli_bf16_cache_gives_the_librarys_bf16_cache_perplexity(text_model, capsys):
    folder, text_file = text_model
    assert main(["perplexity", str(text_file), "--model", str(folder), *CLI_SETTINGS, "--kv-dtype", "bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected, _ = library_perplexity(folder, jnp.bfloat16)
    assert result["kv_dtype"] == "bf16"
    assert abs(result["perplexity"] - expected) <= RELATIVE_TOLERANCE * expected
    assert result["perplexity"] != library_perplexity(folder)[0]  # the cache really was bf16
