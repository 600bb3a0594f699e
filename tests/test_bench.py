"""The benchmark harness runs end to end on a tiny model (speed itself is never a test here)."""

import json

from jax_gpt2.bench import decode_bytes_per_step, format_table, run_benchmarks
from jax_gpt2.cli import main
from jax_gpt2.config import PRESETS, GPT2Config


def test_harness_measures_both_sides_and_the_roofline_on_a_tiny_model():
    # Big enough that 47 decode steps take far longer than timing noise: the speed is a difference of two runs.
    config = GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, [1, 2], [8], new_tokens=48, repeats=2, contexts=[60], progress=False)
    assert [row["batch"] for row in results["decode"]] == [1, 2, 1]
    for row in results["decode"]:
        assert row["tokens_equal"]  # both sides decoded the same greedy tokens
        assert row["jax_tok_s"] > 0
        assert row["hf_tok_s"] > 0
        assert 0 < row["jax_fraction_of_roofline"]
    assert results["bandwidth_gbs"] > 0
    assert "decode B=2" in format_table(results)


def test_a_rate_swamped_by_noise_is_not_a_number_rather_than_negative():
    from jax_gpt2.bench import rate

    assert rate(10, 0.5) == 20.0
    assert rate(10, -0.001) != rate(10, -0.001)  # NaN


def test_gpt2_decode_reads_about_half_a_gigabyte_of_float32_weights_per_step():
    assert 490e6 < decode_bytes_per_step(PRESETS["gpt2"], batch=1, context=0) < 505e6


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["bench", "--preset", "distilgpt2", "--layers", "1", "--batch-sizes", "1", "--contexts", "--prefill", "8"]
    assert main([*args, "--new-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["layers"] == 1
    assert "prefill T=8" in capsys.readouterr().out
