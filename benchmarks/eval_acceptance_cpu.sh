#!/usr/bin/env bash
# Acceptance of the default drafter on 64 held-out prompts (32 held-out ShareGPT + 32 HumanEval,
# none trained on), greedy and at temperature 1, at the default settings (T = 1 step,
# left_to_right, as many drafts as the drafter's trained block holds), bfloat16:
#
#   bash benchmarks/eval_acceptance_cpu.sh [DRAFTER_FOLDER]  -> benchmarks/results/eval_acceptance_cpu.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m specdiff_ext eval-drafter ${1:+--drafter "$1"} --num-prompts 32 --gammas auto --steps 1 \
    --commits left_to_right --temperatures 0,1 --tree-budgets 0,16 --max-new-tokens 96 --dtype bfloat16 \
    --threads "${THREADS:-2}" --no-progress --out benchmarks/results/eval_acceptance_cpu.json \
    | tee benchmarks/results/eval_acceptance_cpu.md
