#!/usr/bin/env bash
# GPU readiness check (issue 16, item 4): on one NVIDIA GPU, a bf16 ZeRO-3 Bellman Distill step and an SFT step
# on a Qwen2.5-0.5B-shaped random model (tokens/s, MFU, peak memory) and teacher sampling throughput on a
# Qwen2.5-3B-shaped one, through bdctl's own engine (benchmarks/gpu_check_helper.py has the details), in
# under 8 minutes, written as JSON.
#
#   benchmarks/gpu_check.sh                         # GPU when one is visible, else the CPU check
#   benchmarks/gpu_check.sh --cpu                   # small shapes on the CPU ("mode": "cpu-small" in the JSON)
#   benchmarks/gpu_check.sh --out /tmp/gpu.json --peak-tflops 989
#
# Options after the script name go to the helper (--cpu, --out, --peak-tflops, --torch-adam, --skip).
# Default output: benchmarks/results/gpu_check.json (benchmarks/results/gpu_check_cpu.json on the CPU).
# Nothing is downloaded: the models are random, built from configs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
limit="${GPU_CHECK_TIMEOUT:-480}"  # seconds: the check's budget (8 minutes)

args=("$@")
cpu=0
has_out=0
for arg in "${args[@]+"${args[@]}"}"; do
  case "$arg" in
    --cpu) cpu=1 ;;
    --out|--out=*) has_out=1 ;;
  esac
done
if [[ $cpu -eq 0 ]] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no GPU visible to torch; running the small CPU check (--cpu)" >&2
  args+=("--cpu")
  cpu=1
fi
if [[ $has_out -eq 0 ]]; then
  if [[ $cpu -eq 1 ]]; then args+=("--out" "$root/benchmarks/results/gpu_check_cpu.json")
  else args+=("--out" "$root/benchmarks/results/gpu_check.json"); fi
fi
# One rank, started here rather than by a launcher: drop a process group's variables a caller may have set.
unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=15 "$limit" "$python" "$here/gpu_check_helper.py" "${args[@]}"
