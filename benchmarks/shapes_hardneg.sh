#!/usr/bin/env bash
# HardNeg LoRA fine-tuning of the bundled ShapesWorld model on the subtasks it finds hardest
# (pair binding, spatial), then every subtask's accuracy next to the base model and CLIP
# (benchmarks/results/shapes-accuracy.{json,md}). About 8 minutes on 2 CPU cores.
#   bash benchmarks/shapes_hardneg.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/shapes-hardneg}
BIN=${BIN:-.venv/bin}
# training split only: held-out combinations and test/compositional placements never appear
$BIN/itm-shapes write --out "$RUN/data" --split train --n 600 \
    --subtasks spatial,pair_binding_color,pair_binding_size --negclip
$BIN/itm-train --data "$RUN/data/negclip.tsv" --model shapes --out "$RUN/train" \
    --negatives hard-text --neg-loss-factor 1.2 --rank 8 --attention all --lr 1e-3 --batch-size 32 \
    --grad-accum 1 --max-steps 500 --checkpoint-every 250 --seed 0
$BIN/itm-shapes report --n 100 --lora "$RUN/train/lora" --out benchmarks/results/shapes-accuracy
