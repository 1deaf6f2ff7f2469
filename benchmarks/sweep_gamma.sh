#!/usr/bin/env bash
# Choose the drafts per round of specdiff and ar-spec for this machine, on held-out ShareGPT
# prompts that the benchmark does not use (entries 16..23 of data/distill_smollm2/heldout.jsonl;
# the benchmark takes the first 8). Greedy, bfloat16, 96 new tokens.
#
#   bash benchmarks/sweep_gamma.sh   -> benchmarks/results/sweep_gamma_cpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
prompts=$(mktemp --suffix .jsonl)
sed -n 17,24p data/distill_smollm2/heldout.jsonl > "$prompts"
out=benchmarks/results/sweep_gamma_cpu.md
: > "$out"
for G in 2 3 4 6 8; do
  echo "## gamma $G (specdiff and ar-spec)" >> "$out"
  python3 -m specdiff_ext bench --decoders ar,specdiff,ar-spec --prompts "$prompts" --max-new-tokens 96 \
      --dtype bfloat16 --threads "${THREADS:-2}" --gamma "$G" --ar-gamma "$G" --no-progress >> "$out"
done
cat "$out"
