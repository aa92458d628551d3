#!/usr/bin/env bash
# The paper preset's code path rehearsed offline on a CPU: rehearsal.py writes small local stand-ins for every
# model and data source (in their formats) and DIR/preset.json (the paper preset pointed at them); then stages
# 1-4 run under the deepspeed launcher on 2 ranks (gloo), and the evaluation. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-runs/rehearsal}
preset=$(python rehearsal.py "$out" | tail -n 1)
for stage in 1 2 3 4; do
  deepspeed --num_gpus 2 train.py --stage "$stage" --preset "$preset" --out "$out"
done
python evaluate.py "$out" --limit 200
