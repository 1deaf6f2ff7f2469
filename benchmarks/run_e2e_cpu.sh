#!/usr/bin/env bash
# The end-to-end results of the README: the default pair on this machine's CPU, bfloat16,
# decoders interleaved prompt by prompt in one process, at temperature 0 and 1, on 8 HumanEval
# and 8 held-out ShareGPT prompts (the defaults of `specdiff bench`).
#
#   bash benchmarks/run_e2e_cpu.sh [GAMMA] [AR_GAMMA] [PLD_GAMMA]
#
# GAMMA (default: the drafter's trained block minus one) / AR_GAMMA / PLD_GAMMA were chosen by
# benchmarks/sweep_gamma.sh on other held-out prompts.
# MAX_NEW (default 128) new tokens per prompt. DTYPE (default bfloat16; float32 on a CPU without native bf16, where bf16 is emulated) and
# TAG (default e2e_cpu_bf16) name the run: writes benchmarks/results/$TAG_t*.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-}
AG=${2:-2}
PG=${3:-4}
out=benchmarks/results
mkdir -p "$out"
for T in 0 1; do
  decs=ar,specdiff,ar-spec,pld
  [ "$T" = 0 ] && decs=$decs,hf-pld
  python3 -m specdiff_ext bench --decoders "$decs" --temperature "$T" \
      --max-new-tokens "${MAX_NEW:-128}" --num-prompts 16 --dtype "${DTYPE:-bfloat16}" --threads "${THREADS:-2}" \
      ${G:+--gamma "$G"} --ar-gamma "$AG" --pld-gamma "$PG" --no-progress \
      --out "$out/${TAG:-e2e_cpu_bf16}_t$T.json" --plot "$out/${TAG:-e2e_cpu_bf16}_t$T.png" \
      | tee "$out/${TAG:-e2e_cpu_bf16}_t$T.md"
done
