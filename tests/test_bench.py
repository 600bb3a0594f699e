"""The benchmark harness runs end to end on a tiny model (speed itself is never a test here)."""

import json

from jax_gpt2.bench import decode_bytes_per_step, format_table, plot_results, run_benchmarks
from jax_gpt2.cli import main
from jax_gpt2.config import PRESETS, GPT2Config


def test_harness_measures_both_sides_and_the_roofline_on_a_tiny_model():
    # Big enough that 47 decode steps take far longer than timing noise: the speed is a difference of two runs.
    config = GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, ["fp32"], [1, 2], [8], new_tokens=48, repeats=2, contexts=[60], progress=False)
    [run] = results["runs"]
    assert [row["batch"] for row in run["decode"]] == [1, 2, 1]
    for row in run["decode"]:
        assert row["token_agreement"] == 1.0  # float32 on both sides: the same greedy tokens
        assert row["jax_tok_s"] > 0
        assert row["hf_tok_s"] > 0
        assert 0 < row["jax_fraction_of_roofline"]
    assert results["bandwidth_gbs"] > 0
    assert run["jax_cold_first_token_s"] > 0
    assert "decode B=2" in format_table(results)


def test_narrowed_dtypes_run_against_transformers_nearest_form(tmp_path):
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, ["bf16", "int8"], [1], [8], new_tokens=4, repeats=1, contexts=[], progress=False)
    assert [run["dtype"] for run in results["runs"]] == ["bf16", "int8"]
    assert [run["transformers_dtype"] for run in results["runs"]] == ["torch.bfloat16", "torch.float32"]
    for run in results["runs"]:
        assert 0 <= run["decode"][0]["token_agreement"] <= 1
    plot_results(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_a_rate_swamped_by_noise_is_not_a_number_rather_than_negative():
    from jax_gpt2.bench import rate

    assert rate(10, 0.5) == 20.0
    assert rate(10, -0.001) != rate(10, -0.001)  # NaN


def test_gpt2_decode_reads_about_half_a_gigabyte_of_float32_weights_per_step():
    assert 490e6 < decode_bytes_per_step(PRESETS["gpt2"], batch=1, context=0) < 505e6


def test_narrow_weights_read_half_and_a_quarter_of_the_matrix_bytes():
    fp32, bf16, int8 = (decode_bytes_per_step(PRESETS["gpt2"], 1, 0, name) for name in ("float32", "bfloat16", "int8"))
    matrices = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768  # 12 blocks' four matrices, lm_head
    assert abs((fp32 - bf16) - 2 * matrices) < 1e6  # block matrices and lm_head at 2 bytes, small vectors at 4
    assert abs((bf16 - int8) - matrices) < 1e6


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["bench", "--preset", "distilgpt2", "--layers", "1", "--batch-sizes", "1", "--contexts", "--prefill", "8"]
    assert main([*args, "--new-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["layers"] == 1
    assert "prefill T=8" in capsys.readouterr().out


def test_bench_refuses_a_cuda_torch_device_that_torch_cannot_see(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--preset", "distilgpt2", "--layers", "1", "--torch-device", "cuda"]) == 2
    assert "--torch-device cuda: torch" in capsys.readouterr().err
