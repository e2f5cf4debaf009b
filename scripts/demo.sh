#!/usr/bin/env bash
# The main job on the embedded default: profile digits-cnn (2 gloo workers, so collectives are
# fitted), plan for 2 workers, train 10 epochs with 2 gloo workers under torchrun on scikit-learn's
# digits, then print the what-if table. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=${DEMO_OUT:-runs/demo}
mkdir -p "$out"
torchrun --standalone --nproc_per_node 2 "$(command -v dpkfac)" profile \
  --model digits-cnn --batch-size 32 --out "$out/profile.json"
dpkfac plan --profile "$out/profile.json" --workers 2 --out "$out/placement.json"
torchrun --standalone --nproc_per_node 2 "$(command -v dpkfac)" train \
  --placement "$out/placement.json" --out "$out/train" --epochs 10
dpkfac whatif --profile "$out/profile.json" --workers 1,2,4,8,16,32,64
