#!/usr/bin/env bash
# The toy preset end to end, offline: stages 1-4 into runs/toy (or $1), the held-out report, then the
# evaluation (STS Benchmark, Lee documents, retrieval; instruction robustness) into runs/toy/scores.json and .png.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-runs/toy}
for stage in 1 2 3 4; do
  python train.py --stage "$stage" --preset toy --out "$out"
done
python report.py "$out"
python evaluate.py "$out"
