#!/usr/bin/env bash
# One command that proves the GPU path on a real NVIDIA card:
#   install  uv sync --frozen --extra cuda (jax[cuda13]: the CUDA 13 wheels the locked torch uses too)
#   card     nvidia-smi, jax.devices(), and what torch sees
#   parity   the gpt2 and gpt2-medium parity tests and generate-vs-transformers tests, JAX on the card
#            (float32 at Precision.HIGHEST, the same <= 1e-4 bar; the reference is transformers on CPU)
#   generate greedy tokens of gpt2 and gpt2-medium shapes against transformers on the same card
#   precision what float32 at HIGHEST costs against default precision (time and distance from transformers)
#   bench    jax-gpt2 bench, fp32 and bf16 at batch 1, 8 and 64, transformers on the same card beside it
#
# Usage:
#   benchmarks/gpu_check.sh                   on a machine with an NVIDIA GPU and a CUDA 13 driver (>= 580)
#   benchmarks/gpu_check.sh --python python3  no install: that interpreter's jax[cuda13], torch, transformers
#   benchmarks/gpu_check.sh --dry-run         on CPU: no install, no card; the steps run with tiny settings
#                                             and the card's commands are listed (the suite tests this)
#
# Results go to $OUT when it is set, else to benchmarks/gpu-check/: gpu_check.log (every step's
# output), summary.json (each step's command, exit code and seconds), parity.xml, generate.json,
# precision.json, bench-gpt2.json. Every step runs even when one before it failed; the exit code
# is 0 only when all passed. The steps' time budgets add up to 9 min 30 s (the install not counted).
# With no GPU visible it stops at once with one line on stderr.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: benchmarks/gpu_check.sh [--dry-run] [--python PYTHON]"
dry_run=0
python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --python) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; python=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done

if [ "$dry_run" = 0 ]; then
  if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi is missing or lists none); run it on a GPU machine, or pass --dry-run to check the script on CPU" >&2
    exit 1
  fi
  driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
  if [ -z "$python" ] && [ -n "$driver_cuda" ] && [ "$driver_cuda" -lt 13 ]; then
    echo "gpu_check: this driver supports CUDA $driver_cuda; the cuda extra (jax[cuda13]) and the locked torch (CUDA 13.2) need CUDA 13 (driver >= 580)" >&2
    exit 1
  fi
fi

out=${OUT:-benchmarks/gpu-check}
mkdir -p "$out" || { echo "gpu_check: cannot create the output folder $out" >&2; exit 1; }
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
steps_tsv=$(mktemp)
trap 'rm -f "$steps_tsv"' EXIT
: > "$log"

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave the card's memory to torch too, not 75% to XLA
if [ "$dry_run" = 1 ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=cuda,cpu  # named platforms must start: no silent fall-back to the CPU
fi
if [ -n "$python" ]; then
  py_words=("$python")
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  py_words=(uv run --no-sync python)  # --no-sync: a plain `uv run` would sync away the cuda extra
fi
py=$(printf '%q ' "${py_words[@]}")
py=${py% }  # the interpreter as shell words, for the step commands

# The steps after the install, one line each: name, time budget in seconds, shell command.
# $1: "card" for the settings a GPU run uses, "dry" for the tiny ones a CPU check uses.
steps() {
  local torch_device=$2 q_out
  q_out=$(printf '%q' "$out")
  local report="import jax, torch; print('jax', jax.__version__, jax.default_backend(), jax.devices()); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'sees', torch.cuda.device_count(), 'GPU(s)')"
  local parity="-m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_generate.py -k '(test_parity and gpt2) or (test_generate and transformers)' --junitxml $q_out/parity.xml"
  if [ "$1" = card ]; then
    printf '%s\t%s\t%s\n' \
      card 30 "nvidia-smi && $py -c \"$report; assert jax.default_backend() == 'gpu'\"" \
      parity 140 "$py $parity" \
      generate 120 "$py benchmarks/gpu_generate.py --presets gpt2 gpt2-medium --torch-device $torch_device --out $q_out/generate.json" \
      precision 100 "$py benchmarks/gpu_precision.py --preset gpt2 --batch-sizes 1 64 --new-tokens 32 --repeats 3 --torch-device $torch_device --out $q_out/precision.json" \
      bench 180 "$py -m jax_gpt2.cli bench --preset gpt2 --dtypes fp32 bf16 --batch-sizes 1 8 64 --contexts --prefill 128 --new-tokens 32 --repeats 3 --torch-device $torch_device --out $q_out/bench-gpt2.json"
  else
    printf '%s\t%s\t%s\n' \
      card 300 "$py -c \"$report\"" \
      parity 300 "$py $parity --collect-only" \
      generate 300 "$py benchmarks/gpu_generate.py --presets distilgpt2 --layers 1 --batch 2 --new-tokens 4 --torch-device cpu --out $q_out/generate.json" \
      precision 300 "$py benchmarks/gpu_precision.py --preset distilgpt2 --layers 1 --prompt-len 16 --batch-sizes 2 --new-tokens 4 --repeats 1 --torch-device cpu --out $q_out/precision.json" \
      bench 300 "$py -m jax_gpt2.cli bench --preset distilgpt2 --layers 1 --dtypes fp32 bf16 --batch-sizes 2 --contexts --prefill --new-tokens 4 --repeats 1 --torch-device cpu --out $q_out/bench-gpt2.json"
  fi
}

run_step() {  # name, budget in seconds, command: its output to the screen and the log, its result to steps_tsv
  local name=$1 budget=$2 command=$3 start=$SECONDS code
  echo "=== $name (budget ${budget} s): $command" | tee -a "$log"
  # stdin from /dev/null: the loop below feeds the step list on stdin, which a step must not eat
  timeout --kill-after=10 "$budget" bash -c "$command" < /dev/null 2>&1 | tee -a "$log"
  code=${PIPESTATUS[0]}
  if [ "$code" = 124 ]; then echo "=== $name: stopped at its budget of $budget s" | tee -a "$log"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" "$budget" "$command" >> "$steps_tsv"
}

if [ "$dry_run" = 1 ]; then
  mode=dry; torch_device=cpu
  card_plan="uv sync --frozen --extra cuda"$'\n'"$(steps card cuda | cut -f3)"
else
  mode=card
  if [ -z "$python" ]; then run_step install 1200 "uv sync --frozen --extra cuda"; fi
  torch_device=$("${py_words[@]}" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
  if [ "$torch_device" = cpu ]; then
    echo "=== note: torch cannot use this card here; transformers runs on the CPU beside JAX on the GPU" | tee -a "$log"
  fi
  card_plan=""
fi
while IFS=$'\t' read -r name budget command; do
  run_step "$name" "$budget" "$command"
done < <(steps "$mode" "$torch_device")

MODE=$mode TORCH_DEVICE=$torch_device CARD_PLAN=$card_plan STEPS_TSV=$steps_tsv SUMMARY=$out/summary.json \
  "${py_words[@]}" - <<'EOF'
import json, os

steps = []
for line in open(os.environ["STEPS_TSV"]).read().splitlines():
    name, code, seconds, budget, command = line.split("\t", 4)
    steps.append(dict(name=name, exit_code=int(code), seconds=int(seconds), budget_s=int(budget), command=command))
summary = dict(
    mode=os.environ["MODE"], transformers_device=os.environ["TORCH_DEVICE"], all_passed=all(s["exit_code"] == 0 for s in steps),
    steps=steps, card_commands=[c for c in os.environ["CARD_PLAN"].splitlines() if c],
)
open(os.environ["SUMMARY"], "w").write(json.dumps(summary, indent=2) + "\n")
print("\n=== summary")
for step in steps:
    verdict = "passed" if step["exit_code"] == 0 else f"FAILED (exit {step['exit_code']})"
    print(f"{step['name']:<10}{verdict:<22}{step['seconds']:>5} s of {step['budget_s']} s")
if summary["card_commands"]:
    print("\non a card it would run:\n  " + "\n  ".join(summary["card_commands"]))
EOF
summary_code=$?
if [ "$summary_code" != 0 ]; then
  echo "gpu_check: could not write $out/summary.json" >&2
  exit 1
fi
echo "results in $out"
cut -f2 "$steps_tsv" | grep -qv '^0$' && exit 1
exit 0
