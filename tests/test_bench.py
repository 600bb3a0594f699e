"""The benchmark harness runs end to end on a tiny model (speed itself is never a test here)."""

import json
import stat
import sys

import numpy as np
import pytest

from jax_gpt2 import kernels, load_weights
from jax_gpt2.tools.bench import (
    LlamaPeer, bench_model_stem, bench_without_kernels, cpu_has_bf16_instructions, decode_bytes_per_step,
    bf16_peer_note, decode_only_rates, format_table, forward_flop_per_token, make_models, peer_has_bf16_instructions,
    peer_isa_caps, plot_results, run_benchmarks, torch_isa_note, transformers_dtype_for, write_bench_model,
)  # fmt: skip
from jax_gpt2.cli import main
from jax_gpt2.config import PRESETS, GPT2Config
from jax_gpt2.kernels.native import cpu_vector_isa
from jax_gpt2.loader import weights_for_dtype
from jax_gpt2.tools.llama_cpp import GGUF_TYPES, gguf_path, llama_bench_command, parse_llama_bench_json


def test_harness_measures_both_sides_and_the_roofline_on_a_tiny_model():
    # Big enough that 47 decode steps take far longer than timing noise (transformers' rate is a difference of two runs).
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
    assert "decode at ctx=60 is" in format_table(results)  # the long-context share of short-context decode


def test_compute_bound_rows_are_given_as_fractions_of_the_measured_fma_peak():
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, ["fp32"], [1], [16], new_tokens=4, repeats=1, contexts=[], progress=False, scoring=((2, 32),))
    [run] = results["runs"]
    [scoring] = run["scoring"]
    assert (scoring["batch"], scoring["prompt_len"]) == (2, 32)
    assert scoring["jax_tok_s"] > 0
    assert scoring["hf_tok_s"] > 0
    table = format_table(results)
    assert "scoring B=2 T=32" in table
    if not kernels.kernels_available():
        assert "fma_peak_gflops" not in results  # the probe lives in the kernels
        return
    assert len(results["fma_peak_samples_gflops"]) == 2  # before the first dtype and after the last
    assert results["fma_peak_gflops"] > 0
    for row in [*run["prefill"], scoring]:
        assert 0 < row["jax_fraction_of_fma_peak"]
        assert 0 < row["hf_fraction_of_fma_peak"]
    assert "of FMA peak" in table


def test_a_gpt2_forward_costs_about_180_mflop_a_token_and_257_with_every_logit():
    gpt2 = PRESETS["gpt2"]
    assert 170e6 < forward_flop_per_token(gpt2, 128, 1 / 128) < 180e6
    assert 250e6 < forward_flop_per_token(gpt2, 1024, 1.0) < 270e6


def test_narrowed_dtypes_run_against_transformers_nearest_form(tmp_path):
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, ["bf16", "int8"], [1], [8], new_tokens=4, repeats=1, contexts=[], progress=False)
    assert [run["dtype"] for run in results["runs"]] == ["bf16", "int8"]
    bf16_peer = "torch.bfloat16" if peer_has_bf16_instructions() is not False else "torch.float32"
    assert [run["transformers_dtype"] for run in results["runs"]] == [bf16_peer, "torch.float32"]
    for run in results["runs"]:
        assert 0 <= run["decode"][0]["token_agreement"] <= 1
    plot_results(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


ZEN3_FLAGS = "flags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n"  # an AVX2 host without bf16 (excerpt)
ZEN4_FLAGS = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni\n"
NEOVERSE_V1 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_bf16_instructions_are_read_from_the_cpu_flags():
    assert cpu_has_bf16_instructions(ZEN3_FLAGS) is False
    assert cpu_has_bf16_instructions(ZEN4_FLAGS) is True
    assert cpu_has_bf16_instructions(NEOVERSE_V1) is True
    assert cpu_has_bf16_instructions("model name\t: avx512_bf16 in a name is not a flag\n") is False


def test_transformers_bf16_peer_is_its_fp32_path_where_the_cpu_lacks_bf16_instructions():
    assert transformers_dtype_for("bf16", "cpu", bf16_instructions=True) == "bf16"
    assert transformers_dtype_for("bf16", "cpu", bf16_instructions=False) == "fp32"
    assert transformers_dtype_for("bf16", "cpu", bf16_instructions=None) == "bf16"  # unknown: as asked
    assert transformers_dtype_for("bf16", "cuda", bf16_instructions=False) == "bf16"  # the GPU has its own
    assert transformers_dtype_for("int8", "cpu", bf16_instructions=True) == "fp32"
    assert transformers_dtype_for("fp32", "cpu", bf16_instructions=True) == "fp32"


def test_our_decode_steps_are_timed_alone_from_one_prefill_each_repeat():
    # One prefill, then every repeat decodes from a fresh copy of it (the decode call takes over its
    # state): a second repeat from a consumed state would fail, and each run checks it made every step.
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    state, _ = make_models(config)
    weights = weights_for_dtype(state, config, np.float32, pack=None)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    rates = decode_only_rates(prompts, weights, config, new_tokens=6, repeats=3, kv_dtype=np.float32)
    assert len(rates) == 3
    assert all(np.isfinite(rate) and rate > 0 for rate in rates)


def test_a_rate_swamped_by_noise_is_not_a_number_rather_than_negative():
    from jax_gpt2.tools.bench import rate

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


TINY_BENCH = GPT2Config(vocab_size=500, n_positions=256, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def test_each_run_records_which_path_ran():
    results = run_benchmarks(TINY_BENCH, ["fp32", "int8"], [1], [], new_tokens=4, repeats=1, contexts=[], progress=False)
    for run in results["runs"]:
        assert run["path"] == ("kernels" if kernels.kernels_available() else "XLA")
        assert run["isa"] in ("avx512", "avx2", "neon") or run["path"] == "XLA"
        assert run["threads"] >= 1
        assert f"[{run['dtype']}] {run['path']} ({run['isa']}, {run['threads']} threads" in format_table(results)
    assert results["kernels"]["available"] == kernels.kernels_available()
    assert [row["dtype"] for row in results["without_kernels"]] == ["fp32", "int8"]
    assert "without the kernels (pack=False" in format_table(results)


def test_the_no_kernel_figure_loads_every_dtype_without_kernels_beside_fp32():
    # Each dtype takes turns with the others, once per round: two rounds, two rates each.
    config = GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    state, _ = make_models(config)
    rows = bench_without_kernels(config, state, ["bf16", "int8"], new_tokens=48, repeats=2, kv_dtype="fp32")
    assert [row["dtype"] for row in rows] == ["fp32", "bf16", "int8"]
    assert [row["matrix_dtype"] for row in rows] == ["float32"] * 3  # widened once at load, on a CPU
    assert rows[0]["ratio_to_fp32"] == 1.0
    assert all(row["jax_tok_s"] > 0 for row in rows)
    assert all(len(row["jax_rates"]) == 2 for row in rows)
    assert all(row["ratio_to_fp32"] == row["jax_tok_s"] / rows[0]["jax_tok_s"] for row in rows)


def test_a_bf16_cache_run_is_recorded_and_counts_half_the_cache_bytes():
    results = run_benchmarks(TINY_BENCH, ["fp32"], [1], [], new_tokens=4, repeats=1, contexts=[40], progress=False, kv_dtype="bf16")
    assert results["kv_dtype"] == "bf16"
    assert "KV cache bf16" in format_table(results)
    config = PRESETS["gpt2"]
    fp32_cache = decode_bytes_per_step(config, 1, 1000) - decode_bytes_per_step(config, 1, 0)
    bf16_cache = decode_bytes_per_step(config, 1, 1000, kv_dtype_name="bfloat16") - decode_bytes_per_step(config, 1, 0)
    assert bf16_cache == fp32_cache / 2
    assert fp32_cache == 4 * 2 * 12 * 1000 * 768  # keys and values, 12 layers, 1000 tokens, 768 wide


@pytest.mark.parametrize(
    ("cpuinfo", "isa"),
    [
        ("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16\n", "avx512"),
        ("flags\t\t: fpu sse2 avx avx2 fma bmi2\n", "avx2"),
        ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", "neon"),
    ],
    ids=["zen4", "zen3", "graviton"],
)
def test_the_cpu_vector_isa_is_read_from_cpuinfo(cpuinfo, isa):
    assert cpu_vector_isa(cpuinfo) == isa


# --- llama.cpp -------------------------------------------------------------------------------------

FAKE_LLAMA_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert value("-o") == "json"
prompts, n, t = [int(p) for p in value("-p").split(",")], int(value("-n")), int(value("-t"))
common = dict(n_threads=t, model_type="gpt2 fake", build_commit="fake")
print(json.dumps([
    *[dict(common, n_prompt=p, n_gen=0, avg_ts=500.0 - p / 8, stddev_ts=5.0) for p in prompts],
    dict(common, n_prompt=0, n_gen=n, avg_ts=50.0, stddev_ts=0.5),
]))
"""


def test_a_llama_bench_binary_adds_a_third_column(tmp_path):
    """The plumbing only, with a stand-in that prints llama-bench's JSON: the real figures are measured, not tested."""
    binary = tmp_path / "llama-bench"
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    stem = "tiny-L2"
    for dtype in GGUF_TYPES:
        gguf_path(tmp_path, stem, dtype).write_bytes(b"GGUF")
    llama = LlamaPeer(binary, tmp_path, stem, threads=2)
    results = run_benchmarks(TINY_BENCH, ["fp32", "int8"], [1], [128], new_tokens=4, repeats=1, contexts=[], progress=False, llama=llama)
    for run in results["runs"]:
        assert run["llama"]["tg_tok_s"] == 50.0
        assert run["llama"]["pp_tok_s"] == 484.0
        assert run["llama"]["pp_by_prompt_len"] == {"128": 484.0, "512": 436.0}
        assert run["llama"]["threads"] == 2
        assert run["llama"]["gguf"] == f"tiny-L2-{GGUF_TYPES[run['dtype']]}.gguf"
    table = format_table(results)
    assert "llama.cpp q8_0 (2 threads): tg128 50.0 tok/s, pp128 484.0 tok/s, pp512 436.0 tok/s" in table
    plot_results(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_a_missing_gguf_file_says_how_to_make_it(tmp_path):
    llama = LlamaPeer(tmp_path / "llama-bench", tmp_path, "nothing", threads=2)
    (tmp_path / "llama-bench").write_text("")
    with pytest.raises(FileNotFoundError, match="build_llama_cpp.sh convert"):
        run_benchmarks(TINY_BENCH, ["fp32"], [1], [], new_tokens=2, repeats=1, contexts=[], progress=False, llama=llama)


def test_a_llama_bench_that_crashes_ends_the_run_before_our_measurements(tmp_path, monkeypatch):
    """A llama-bench built for another CPU dies of SIGILL or SIGSEGV: say so, before minutes of our figures."""
    binary = tmp_path / "llama-bench"
    binary.write_text("#!/bin/sh\nkill -SEGV $$\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    for dtype in GGUF_TYPES:
        gguf_path(tmp_path, "tiny-L2", dtype).write_bytes(b"GGUF")
    measured = []
    monkeypatch.setattr("jax_gpt2.tools.bench.bench_dtype", lambda *args: measured.append(args))
    llama = LlamaPeer(binary, tmp_path, "tiny-L2", threads=2)
    with pytest.raises(ValueError, match="died of SIGSEGV on tiny-L2-f32.gguf: a build for another CPU"):
        run_benchmarks(TINY_BENCH, ["fp32"], [1], [], new_tokens=2, repeats=1, contexts=[], progress=False, llama=llama)
    assert measured == []


def test_llama_bench_runs_with_our_thread_count_and_reads_pp_and_tg():
    command = llama_bench_command("llama-bench", "m.gguf", threads=2, prompt_len=128, new_tokens=128, repeats=3)
    assert command[command.index("-t") + 1] == "2"
    both = llama_bench_command("llama-bench", "m.gguf", 2, 128, 128, 3, more_prompt_lens=(512,))
    assert both[both.index("-p") + 1] == "128,512"
    report = json.dumps([
        dict(n_prompt=128, n_gen=0, avg_ts=658.0, stddev_ts=3.0, n_threads=2),
        dict(n_prompt=0, n_gen=128, avg_ts=135.1, stddev_ts=1.0, n_threads=2),
    ])  # fmt: skip
    figures = parse_llama_bench_json(report, 128, 128)
    assert (figures["pp_tok_s"], figures["tg_tok_s"]) == (658.0, 135.1)
    with pytest.raises(ValueError, match="not pp512 and tg128"):
        parse_llama_bench_json(report, 512, 128)


def test_the_model_written_for_llama_cpp_holds_the_benchs_own_weights(tmp_path):
    """Same preset, layers, std and seed: the GGUF files are conversions of what bench measures."""
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(50257)}))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    stem = write_bench_model(tmp_path / "model", "distilgpt2", 1, vocab)
    assert stem == bench_model_stem("distilgpt2", 1)
    config_json = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config_json["n_ctx"] == 1024
    assert config_json["n_layer"] == 1
    state, _ = make_models(GPT2Config(n_layer=1))
    written = load_weights(tmp_path / "model", pack=False)
    np.testing.assert_array_equal(np.asarray(written.blocks[0].fc_w_DF), state["h.0.mlp.c_fc.weight"])
    np.testing.assert_array_equal(np.asarray(written.wte_VD), state["wte.weight"])


def test_bench_refuses_a_cuda_torch_device_that_torch_cannot_see(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--preset", "distilgpt2", "--layers", "1", "--torch-device", "cuda"]) == 2
    assert "--torch-device cuda: torch" in capsys.readouterr().err


def test_the_bf16_dot_option_loads_and_labels_the_bf16_run():
    if not (kernels.kernels_available() and kernels.native.has_bf16_dot()):
        pytest.skip("the bf16 dot path needs the kernels built with AVX512_BF16 (no avx512_bf16 here)")
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    results = run_benchmarks(config, ["fp32", "bf16"], [1], [16], new_tokens=4, repeats=1, contexts=[], progress=False, bf16_dot=True)
    assert [run["bf16_dot"] for run in results["runs"]] == [False, True]
    assert "[bf16 --bf16-dot]" in format_table(results)
    assert "[fp32]" in format_table(results)


def test_the_bf16_dot_option_without_a_bf16_run_is_refused():
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match="include bf16"):
        run_benchmarks(config, ["fp32"], [1], [], new_tokens=2, repeats=1, contexts=[], progress=False, bf16_dot=True)


def test_a_peer_capped_to_avx2_is_named_beside_the_figures():
    """On an AVX-512 host standing in for an AVX2 one, transformers' code is capped by environment
    variables; the results record them and torch's ISA, and the table says so. Uncapped, it says nothing."""
    environment = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "HOME": "/x"}
    caps = peer_isa_caps(environment)
    assert caps == {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    note = torch_isa_note({"torch_cpu_capability": "AVX2", "peer_isa_caps": caps})
    assert note == ", code for AVX2 (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2)"
    assert peer_isa_caps({"HOME": "/x"}) == {}
    assert torch_isa_note({"torch_cpu_capability": "AVX512", "peer_isa_caps": {}}) == ""
    assert torch_isa_note({}) == ""  # results written before the fields existed


def test_a_peer_capped_below_bf16_instructions_compares_with_float32():
    """Capped to AVX2, transformers' bf16 is emulated (one bench row took 7 minutes so on a Zen 3):
    our bf16 is then compared with its float32, as on a CPU without the instructions, and the note says why."""
    assert peer_has_bf16_instructions(ZEN4_FLAGS, {}) is True
    assert peer_has_bf16_instructions(ZEN4_FLAGS, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) is False
    assert peer_has_bf16_instructions(ZEN4_FLAGS, {"ATEN_CPU_CAPABILITY": "avx2"}) is False
    assert peer_has_bf16_instructions(ZEN4_FLAGS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) is True
    assert peer_has_bf16_instructions(ZEN3_FLAGS, {}) is False
    assert bf16_peer_note("fp32", "bf16", {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "fp32: its code is capped below bf16 instructions"
    assert bf16_peer_note("fp32", "bf16", {}) == "fp32: this CPU has no bf16 instructions"
    # a cap that leaves bf16 instructions in is not why: the CPU is
    assert bf16_peer_note("fp32", "bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == "fp32: this CPU has no bf16 instructions"
    assert bf16_peer_note("bf16", "bf16", {}) == ""
    assert bf16_peer_note("fp32", "int8", {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ""
