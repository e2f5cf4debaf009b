#!/usr/bin/env bash
# Re-measure the reference profiles in profiles/ on this machine: every zoo model that trains
# here, under torchrun with 2 gloo processes (so collectives are measured and fitted), one
# thread per process. The analytic ResNet-50 profile comes from bench/resnet50_profile.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
for spec in digits-cnn:32 digits-mlp:32 resnet20:32 resnet32:32 bert-mini:8; do
  model=${spec%%:*} batch=${spec##*:}
  torchrun --standalone --nproc_per_node 2 "$(command -v dpkfac)" profile --model "$model" \
    --batch-size "$batch" --out "profiles/$model.b$batch.cpu2-gloo.json"
done
