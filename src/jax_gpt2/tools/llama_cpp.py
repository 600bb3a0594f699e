"""llama.cpp as a benchmark peer: its own `llama-bench` tool on GGUF conversions of the bench's weights.

benchmarks/build_llama_cpp.sh builds llama-bench from source and converts the folder that
`bench.write_bench_model` writes (the very weights `jax-gpt2 bench` draws) into three GGUF files,
one per pair of weight types: our fp32 / its f32, bf16 / f16, int8 / q8_0. llama.cpp's q8_0 keeps an
f16 scale per block of 32 weights where our int8 keeps a float32 scale per output column: both
about one byte per weight. `run_llama_bench` runs one file and reads llama-bench's JSON report:
pp (prompt tokens/s, the whole prompt in one batch) and tg (batch-1 decode tokens/s, starting from an
empty context).
"""

import json
import signal
import subprocess
from pathlib import Path

from jax_gpt2.config import WEIGHT_DTYPES

# Our weight dtype name -> llama.cpp's --outtype / GGUF tensor type of the same width.
GGUF_TYPES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}
assert set(GGUF_TYPES) == set(WEIGHT_DTYPES), "a llama.cpp type for every weight dtype"


def gguf_path(gguf_dir: Path, stem: str, dtype: str) -> Path:
    """Where the conversion script puts the GGUF of model `stem` in the type paired with `dtype`."""
    assert dtype in GGUF_TYPES, dtype
    assert stem
    return Path(gguf_dir) / f"{stem}-{GGUF_TYPES[dtype]}.gguf"


def llama_bench_command(
    binary: Path, gguf: Path, threads: int, prompt_len: int, new_tokens: int, repeats: int,
    more_prompt_lens: tuple[int, ...] = (),
) -> list[str]:  # fmt: skip
    """llama-bench's command line: pp at `prompt_len` (and at each of `more_prompt_lens`), tg at `new_tokens`."""
    assert threads >= 1
    assert repeats >= 1
    prompts = ",".join(str(length) for length in (prompt_len, *more_prompt_lens))
    return [
        str(binary), "-m", str(gguf), "-t", str(threads), "-p", prompts, "-n", str(new_tokens),
        "-r", str(repeats), "-o", "json",
    ]  # fmt: skip


def parse_llama_bench_json(text: str, prompt_len: int, new_tokens: int) -> dict:
    """pp and tg tokens/s (llama-bench's average over its repetitions) from its `-o json` report."""
    records = json.loads(text)
    assert isinstance(records, list)
    by_test = {(record["n_prompt"], record["n_gen"]): record for record in records}
    if (prompt_len, 0) not in by_test or (0, new_tokens) not in by_test:
        raise ValueError(f"llama-bench reported tests {sorted(by_test)}, not pp{prompt_len} and tg{new_tokens}")
    pp, tg = by_test[(prompt_len, 0)], by_test[(0, new_tokens)]
    return dict(
        pp_tok_s=float(pp["avg_ts"]), pp_stddev=float(pp["stddev_ts"]), tg_tok_s=float(tg["avg_ts"]),
        tg_stddev=float(tg["stddev_ts"]), prompt_len=prompt_len, new_tokens=new_tokens,
        threads=int(tg["n_threads"]), model_type=str(tg.get("model_type", "")), build=str(tg.get("build_commit", "")),
        pp_by_prompt_len={str(n): float(r["avg_ts"]) for (n, gen), r in sorted(by_test.items()) if gen == 0 and n > 0},
    )  # fmt: skip


def run_llama_bench(
    binary: Path, gguf: Path, threads: int, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 3,
    more_prompt_lens: tuple[int, ...] = (512,),
) -> dict:  # fmt: skip
    """llama-bench's pp`prompt_len` (and pp at `more_prompt_lens`: pp_by_prompt_len) and tg`new_tokens`
    on one GGUF file, with `threads` threads."""
    if not Path(binary).is_file():
        raise FileNotFoundError(f"no llama-bench at {binary} (bash benchmarks/build_llama_cpp.sh build)")
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"no GGUF file {gguf} (bash benchmarks/build_llama_cpp.sh convert PRESET [LAYERS])")
    command = llama_bench_command(Path(binary), Path(gguf), threads, prompt_len, new_tokens, repeats, more_prompt_lens)
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode < 0:
        raise ValueError(
            f"llama-bench died of {signal.Signals(-result.returncode).name} on {Path(gguf).name}: a build for another "
            f"CPU? rebuild it here (rm -r .peers/llama.cpp/build; bash benchmarks/build_llama_cpp.sh build)"
        )
    if result.returncode != 0:
        raise ValueError(f"llama-bench failed ({result.returncode}): {result.stderr.strip()[-1000:]}")
    figures = parse_llama_bench_json(result.stdout, prompt_len, new_tokens)
    figures["gguf"] = Path(gguf).name
    assert figures["tg_tok_s"] > 0
    return figures
