#!/usr/bin/env bash
# Self-distillation (paper 2.4), measured: the short MRL heads of stage 3 taught by the teachers' target (the run's
# own stage 3, the paper's), by FC1's own vectors, or by both; the last two trained from the same stage 2 (of
# runs/toy, or $1) with the same seed and steps. Then their held-out scores side by side.
set -euo pipefail
cd "$(dirname "$0")"
base=$(realpath "${1:-runs/toy}")
mkdir -p runs/self-distill
ln -sfn "$base" runs/self-distill/target
for teacher in fc1 both; do
  out=runs/self-distill/$teacher
  mkdir -p "$out"
  for part in data teachers stage1 stage2; do ln -sfn "$base/$part" "$out/$part"; done
  python train.py --stage 3 --preset toy --out "$out" --short-teacher "$teacher"
done
python report.py --compare runs/self-distill/{target,fc1,both}
