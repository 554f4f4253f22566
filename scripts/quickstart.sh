#!/usr/bin/env bash
# The main job, end to end, on a fresh clone:
#   environment -> train tiny softmax & Elliptical models on WikiText-2 -> test (clean)
#   -> word-swap the test set and evaluate clean vs contaminated -> finetune both on SST-2
#   -> print one result table (also written to results/quickstart/summary.md).
# About 48 minutes on a 2-core CPU with bf16 matrix instructions (2 x 15-18 min training, 2 x 0.5 min test, ~4 min
# evaluation, 2 x 5.5 min SST-2; measured 2026-12-06); about 2 h 15 min in float32 on an AVX2-only one (2 x 37 min training).
# Data: found locally (./data, $LM_DATA_DIR, ../shared/data) or downloaded into ./data on first use.
# Everything is resumable: re-running continues unfinished runs and reuses finished ones.
# QUICK=1 shrinks every stage to a smoke run of a few minutes (numbers then mean nothing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
QUICK="${QUICK:-0}"
VARIANTS="${VARIANTS:-softmax elliptical}"
OUT="${OUT:-results/quickstart}"
EXTRA=()
# One epoch of SST-2 (the recipe says 2): 8 minutes per model on this CPU instead of 16.
FT_EXTRA=(--trainer.max_epochs 1)
EVAL_EXTRA=()
SUFFIX=""
if [ "$QUICK" = "1" ]; then
  OUT="${OUT}-quick"
  SUFFIX="-quick"
  EXTRA=(--trainer.max_steps 60 --trainer.val_check_interval 30 --trainer.limit_val_batches 2 --model.optim.warmup_steps 10)
  FT_EXTRA=(--trainer.max_epochs 1 --trainer.limit_train_batches 30 --trainer.limit_val_batches 5)
  EVAL_EXTRA=(--limit_batches 10)
fi
# Precision: the recipes say `auto` (lm/precision.py): bf16-mixed on a CPU with bf16 matrix instructions, float32
# on one without (an AVX2-only CPU, where bf16 is many times slower); `lm` prints which it chose.
mkdir -p "$OUT"
ckpts=()
for v in $VARIANTS; do
  run="runs/wikitext2-tiny-${v}${SUFFIX}"
  resume=()
  [ -f "$run/checkpoints/last.ckpt" ] && resume=(--ckpt_path last)
  echo "== [$v] train ($run)"
  start=$(date +%s)
  lm fit --config configs/wikitext2/tiny.yaml --config "configs/wikitext2/variants/${v}.yaml" \
     --trainer.default_root_dir "$run" --trainer.enable_progress_bar false "${EXTRA[@]}" "${resume[@]}"
  echo "$(( $(date +%s) - start ))" > "$run/train_wall_s.txt"
  echo "== [$v] test (clean, segments protocol)"
  lm test --config configs/wikitext2/tiny.yaml --config "configs/wikitext2/variants/${v}.yaml" \
     --trainer.default_root_dir "$run" --ckpt_path "$run/checkpoints/last.ckpt" --trainer.enable_progress_bar false \
     ${EVAL_EXTRA:+--trainer.limit_test_batches 10}
  ckpts+=("$run/checkpoints/last.ckpt")
done
echo "== word-swap the WikiText-2 test set and evaluate clean vs contaminated"
lm evaluate --ckpts "$(IFS=,; echo "${ckpts[*]}")" --corruptions word_swap:0.015,word_swap:0.025 \
   --out "$OUT/evaluate" "${EVAL_EXTRA[@]}"
for v in $VARIANTS; do
  run="runs/wikitext2-tiny-${v}${SUFFIX}"
  ft="runs/sst2-tiny-${v}${SUFFIX}"
  resume=()
  [ -f "$ft/checkpoints/last.ckpt" ] && resume=(--ckpt_path last)
  echo "== [$v] finetune on SST-2 ($ft)"
  lm finetune fit --config configs/sst2/finetune.yaml --model.pretrained "$run/checkpoints/last.ckpt" \
     --trainer.default_root_dir "$ft" --trainer.enable_progress_bar false "${FT_EXTRA[@]}" "${resume[@]}"
done
python scripts/quickstart_table.py --variants $VARIANTS --quick "$QUICK" --out "$OUT/summary.md"
