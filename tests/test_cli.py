"""The command line: `next`, `compare` and `random-model` on local folders, and one clear line
(no traceback) for user mistakes."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2.cli import main
from jax_gpt2.tools.random_model import train_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random transformers checkpoint with a byte-level BPE trained to its vocabulary size."""
    folder = tmp_path_factory.mktemp("tiny-cli")
    vocab_size = train_tokenizer(folder, 300)
    config = hf_config(**{**TINY, "vocab_size": vocab_size})
    save_safetensors(random_hf_model(config, std=0.3), folder)
    return folder


def test_next_prints_top_k_tokens_with_probabilities(tiny_model_dir, capsys):
    assert main(["next", "Hello world", "--model", str(tiny_model_dir), "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " p = " in line]
    assert len(rows) == 5
    probs = [float(line.rsplit("p = ", 1)[1]) for line in rows]
    assert probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1.0 + 1e-6


def test_compare_passes_on_a_transformers_checkpoint(tiny_model_dir, capsys):
    assert main(["compare", "--model", str(tiny_model_dir), "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count(": PASS") == 3
    assert "batches tested: 3, passed: 3, pass rate: 100.0%" in out


def test_compare_fails_with_nonzero_exit_when_weights_disagree(tiny_model_dir, tmp_path, capsys):
    """Corrupt one weight in a copy: jax-gpt2 loads the copy, transformers the original."""
    import jax_gpt2.cli as cli

    _, config, weights = cli._load_model(str(tiny_model_dir))
    broken = weights.__class__(**{**weights.__dict__, "lnf_bias_D": weights.lnf_bias_D + 1.0})
    original = cli._load_model
    cli._load_model = lambda name: (tiny_model_dir, config, broken)
    try:
        assert main(["compare", "--model", str(tiny_model_dir), "--batches", "2"]) == 1
    finally:
        cli._load_model = original
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "passed: 0" in out


def test_missing_model_folder_is_one_line_on_stderr(capsys):
    assert main(["next", "hi", "--model", "./no-such-folder"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no such model folder" in err
    assert "Traceback" not in err


def test_serve_with_a_missing_model_folder_is_one_line_on_stderr(capsys):
    """serve loads its weights on a thread of their own (beside importing the web stack): the
    loader's error still reaches the user as one line."""
    assert main(["serve", "--model", "./no-such-folder"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no such model folder" in err
    assert "Traceback" not in err


def test_hub_name_offline_says_how_to_use_a_local_folder(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["next", "hi", "--model", "openai-community/gpt2"]) == 2
    err = capsys.readouterr().err
    assert "local folder" in err
    assert "Traceback" not in err


def test_random_model_writes_a_folder_that_next_can_run(tmp_path, capsys):
    folder = tmp_path / "random-distilgpt2"
    assert main(["random-model", str(folder), "--preset", "distilgpt2", "--std", "0.2"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (6, 768, 12)
    assert main(["next", "The cache", "--model", str(folder), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if " p = " in line]) == 3


def test_bad_flag_value_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["next", "hi", "--top-k", "0"])
    assert exit_info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_generate_streams_greedy_text_equal_to_the_library(tiny_model_dir, capsys):
    from jax_gpt2 import load_config, load_weights
    from jax_gpt2.generate import generate
    from jax_gpt2.tokenizer import encode, load_tokenizer

    tokenizer, config = load_tokenizer(tiny_model_dir), load_config(tiny_model_dir)
    new_ids = generate([encode(tokenizer, "Hello")], load_weights(tiny_model_dir), config, max_new_tokens=8)[0]
    expected = "Hello" + tokenizer.decode(new_ids, skip_special_tokens=False)
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--ignore-eos"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("dtype_name, dtype", [("bf16", "bfloat16"), ("int8", "int8")])
def test_generate_with_narrow_weights_equals_the_library_at_that_dtype(dtype_name, dtype, tiny_model_dir, capsys):
    from jax_gpt2 import load_config, load_weights
    from jax_gpt2.generate import generate
    from jax_gpt2.tokenizer import encode, load_tokenizer

    tokenizer, config = load_tokenizer(tiny_model_dir), load_config(tiny_model_dir)
    weights = load_weights(tiny_model_dir, dtype=jnp.dtype(dtype))
    new_ids = generate([encode(tokenizer, "Hello")], weights, config, max_new_tokens=8)[0]
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--ignore-eos"]
    assert main([*args, "--dtype", dtype_name]) == 0
    assert capsys.readouterr().out == "Hello" + tokenizer.decode(new_ids, skip_special_tokens=False) + "\n"


def test_bf16_dot_with_other_weights_is_one_clear_line(tiny_model_dir, capsys):
    assert main(["next", "hi", "--model", str(tiny_model_dir), "--bf16-dot"]) == 2
    assert_one_error_line(capsys.readouterr().err, "jax-gpt2 next: error: bf16_dot=True multiplies bfloat16 weights")


def test_perplexity_with_bf16_dot_stays_near_the_exact_bf16_perplexity(tiny_model_dir, tmp_path, capsys):
    """The option moves the logits by the activations' rounding only: the perplexity by far less than 1%."""
    from jax_gpt2.kernels import native

    if not (native.kernels_available() and native.has_bf16_dot()):
        pytest.skip("the bf16 dot path needs the kernels built with AVX512_BF16 (no avx512_bf16 here)")
    text = tmp_path / "text.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog. " * 8)
    results = {}
    for flags in ([], ["--bf16-dot"]):
        assert main(["perplexity", str(text), "--model", str(tiny_model_dir), "--dtype", "bf16", "--json", *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        results[result["bf16_dot"]] = result["perplexity"]
    assert set(results) == {False, True}
    assert abs(results[True] / results[False] - 1) < 1e-2


def test_generate_with_a_bf16_cache_equals_the_library_with_that_cache(tiny_model_dir, capsys):
    from jax_gpt2 import load_config, load_weights
    from jax_gpt2.generate import generate
    from jax_gpt2.tokenizer import encode, load_tokenizer

    tokenizer, config = load_tokenizer(tiny_model_dir), load_config(tiny_model_dir)
    weights = load_weights(tiny_model_dir)
    new_ids = generate([encode(tokenizer, "Hello")], weights, config, max_new_tokens=8, kv_dtype=jnp.bfloat16)[0]
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--ignore-eos"]
    assert main([*args, "--kv-dtype", "bf16"]) == 0
    assert capsys.readouterr().out == "Hello" + tokenizer.decode(new_ids, skip_special_tokens=False) + "\n"


def test_generate_with_logit_bias_and_penalties_equals_the_library(tiny_model_dir, capsys):
    from jax_gpt2 import load_config, load_weights
    from jax_gpt2.generate import generate
    from jax_gpt2.tokenizer import encode, load_tokenizer

    tokenizer, config = load_tokenizer(tiny_model_dir), load_config(tiny_model_dir)
    new_ids = generate([encode(tokenizer, "Hello")], load_weights(tiny_model_dir), config, max_new_tokens=8,
                       logit_bias={40: 4.0, 41: -100.0}, frequency_penalty=0.7, presence_penalty=-0.3)[0]  # fmt: skip
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--ignore-eos",
            "--logit-bias", "40=4", "--logit-bias", "41=-100", "--frequency-penalty", "0.7", "--presence-penalty", "-0.3"]
    assert main(args) == 0
    assert capsys.readouterr().out == "Hello" + tokenizer.decode(new_ids, skip_special_tokens=False) + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "Hi", "--model", str(tiny_model_dir), "--logit-bias", "40"])
    assert exit_info.value.code == 2
    assert "TOKEN_ID=VALUE" in capsys.readouterr().err


def test_generate_with_a_json_schema_or_a_regex_obeys_it(tiny_model_dir, tmp_path, capsys):
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = ["generate", "Data:", "--model", str(tiny_model_dir), "--max-new-tokens", "20", "--temperature", "1"]
    assert main([*args, "--json-schema", str(tmp_path / "schema.json")]) == 0
    answer = json.loads(capsys.readouterr().out[len("Data:") :])
    assert set(answer) == {"n"}
    assert 0 <= answer["n"] <= 9
    assert main([*args, "--regex", "[a-c]{4}"]) == 0
    out = capsys.readouterr().out
    assert len(out) == len("Data:") + 5
    assert set(out[len("Data:") : -1]) <= set("abc")
    (tmp_path / "bad.json").write_text(json.dumps({"not": {}}))
    assert main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "cannot be compiled" in capsys.readouterr().err


def test_generate_ends_the_text_at_a_stop_string(tiny_model_dir, capsys):
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--ignore-eos"]
    assert main(args) == 0
    full = capsys.readouterr().out.rstrip("\n")
    stop = full[len("Hello") + 2 : len("Hello") + 4]  # two characters from inside the continuation
    assert main([*args, "--stop", stop]) == 0
    stopped = capsys.readouterr().out.rstrip("\n")
    assert stopped == full[: full.index(stop, len("Hello"))]


def test_generate_runs_several_prompts_from_a_file_as_one_batch(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nThe cache\n\nA token\n")
    assert main(["generate", "--file", str(prompts), "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- ")] == [
        "--- 'Hello'", "--- 'The cache'", "--- 'A token'",
    ]  # fmt: skip


def test_generate_bad_sampling_value_is_one_clear_line(tiny_model_dir, capsys):
    assert main(["generate", "Hi", "--model", str(tiny_model_dir), "--top-p", "1.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "jax-gpt2 generate: error: top_p must be in (0, 1] (1 is off); got 1.5"


def test_cli_commands_write_jax_persistent_compilation_cache(tiny_model_dir, tmp_path):
    """A second run of the CLI starts warm: compiled programs land in $XDG_CACHE_HOME/jax-gpt2/xla.

    A fresh process, as a user's command is: JAX fixes its cache folder at the first compile.
    """
    import os
    import subprocess
    import sys

    args = ["generate", "Hello there", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "jax_gpt2.cli", *args], env=env, check=True, capture_output=True)
    assert len(list((tmp_path / "jax-gpt2" / "xla").iterdir())) >= 1


# --- no traceback, ever: config.json values and input files -------------------------------------


def assert_one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert expected in err, err


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("n_layer", "2", 'config.n_layer must be an integer; got "2" (str)'),
    ("n_layer", 2.5, "config.n_layer must be an integer; got 2.5 (float)"),
    ("n_layer", True, "config.n_layer must be an integer; got true (bool)"),  # not read as 1 layer
    ("layer_norm_epsilon", "x", 'config.layer_norm_epsilon must be a number; got "x" (str)'),
])  # fmt: skip
def test_config_value_of_the_wrong_type_is_one_line_naming_the_key(tiny_model_dir, tmp_path, capsys, key, value, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    assert main(["next", "hi", "--model", str(folder)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"jax-gpt2 next: error: {expected}")


def test_perplexity_of_a_folder_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["perplexity", str(tmp_path), "--model", str(tiny_model_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"text file {tmp_path} is a folder")


def binary_file(folder: Path) -> Path:
    path = folder / "weights.bin"
    path.write_bytes(b"GPT\xff\xfe\x00\x81 not text")
    return path


def test_perplexity_of_a_binary_file_names_the_file(tiny_model_dir, tmp_path, capsys):
    path = binary_file(tmp_path)
    assert main(["perplexity", str(path), "--model", str(tiny_model_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"text file {path} is not UTF-8 text (byte 3: invalid start byte)")


def test_generate_with_a_binary_prompt_file_names_the_file(tiny_model_dir, tmp_path, capsys):
    path = binary_file(tmp_path)
    assert main(["generate", "--file", str(path), "--model", str(tiny_model_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--file {path} is not UTF-8 text (byte 3: invalid start byte)")


def test_generate_with_a_folder_as_prompt_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--file", str(tmp_path), "--model", str(tiny_model_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--file {tmp_path} is a folder")
