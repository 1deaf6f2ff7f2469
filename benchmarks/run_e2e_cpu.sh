#!/usr/bin/env bash
# The end-to-end results of the README: the default pair on this machine's CPU, bfloat16,
# decoders interleaved prompt by prompt in one process, at temperature 0 and 1, on 8 HumanEval
# and 8 held-out ShareGPT prompts (the defaults of `specdiff bench`).
#
#   bash benchmarks/run_e2e_cpu.sh [GAMMA] [AR_GAMMA]
#
# GAMMA / AR_GAMMA (drafts per round of specdiff / ar-spec) were chosen by
# benchmarks/sweep_gamma.sh on other held-out prompts. Writes benchmarks/results/e2e_cpu_bf16_t*.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-4}
AG=${2:-3}
out=benchmarks/results
mkdir -p "$out"
for T in 0 1; do
  python3 -m specdiff_ext bench --decoders ar,specdiff,ar-spec,hf,hf-assisted --temperature "$T" \
      --max-new-tokens 128 --num-prompts 16 --dtype bfloat16 --threads 2 \
      --gamma "$G" --ar-gamma "$AG" --hf-assistant-tokens "$AG" \
      --out "$out/e2e_cpu_bf16_t$T.json" --plot "$out/e2e_cpu_bf16_t$T.png" \
      | tee "$out/e2e_cpu_bf16_t$T.md"
done
