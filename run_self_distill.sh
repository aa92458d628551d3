#!/usr/bin/env bash
# Self-distillation (paper 2.4), measured: stage 3 three times from the same stage 2 (of runs/toy, or $1),
# same seed and steps, the short MRL heads taught by the teachers' target, by FC1's own vectors, or by both;
# then their held-out scores side by side.
set -euo pipefail
cd "$(dirname "$0")"
base=$(realpath "${1:-runs/toy}")
for teacher in target fc1 both; do
  out=runs/self-distill/$teacher
  mkdir -p "$out"
  for part in data teachers stage1 stage2; do ln -sfn "$base/$part" "$out/$part"; done
  python train.py --stage 3 --preset toy --out "$out" --short-teacher "$teacher"
done
python report.py --compare runs/self-distill/{target,fc1,both}
