#!/usr/bin/env bash
# GPU smoke test: the whole pipeline with device=cuda precision=bf16, and 8 runs stacked (a few minutes on one GPU).
# Prints the device, precision, torch/CUDA versions and the stage table; fails if CUDA is missing.
# Usage: benchmarks/gpu_smoke.sh [PYTHON] [extra --set overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PYEOF
RUN_DIR="$(mktemp -d)/gpu_smoke"
# The default pipeline (3000 queries, SFT 15 / RCE 3 / GRPO 8 epochs) plus the GRPO modes that touch the device
# differently: sampling on the CPU generator and the precomputed SFT reference.
time "$PY" -m v3kit run --set device=cuda --set precision=bf16 --set progress=false --set run_dir="$RUN_DIR/default" "$@"
time "$PY" -m v3kit run --set device=cuda --set precision=bf16 --set progress=false --set run_dir="$RUN_DIR/sampled" \
    --set grpo.samples=sampled --set grpo.kl_reference=sft --set grpo.epochs=2 "$@"
# Many runs in one on the device: 8 seeds of a reduced default world stacked vs one after another (the stack's
# batched matmuls fill the GPU that one tiny run leaves idle); prints the two times and their ratio.
time "$PY" benchmarks/stacked.py --quick --device cuda --k 8
"$PY" - "$RUN_DIR/default" <<'PYEOF'
import sys
from pathlib import Path
import torch
from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
# A checkpoint trained on the GPU loads on the CPU and holds only CPU tensors.
path = Path(sys.argv[1]) / "grpo_epoch8.pt"
raw = torch.load(path, weights_only=True)  # no map_location: tensors come back where they were saved from
devices = {t.device.type for t in raw["model"].values()} | {t.device.type for t in raw["optimizer"]["state"][0].values()}
model_from_checkpoint(load_checkpoint(path))
print(f"grpo_epoch8.pt tensors on {devices}; loads on the CPU: ok")
assert devices == {"cpu"}
PYEOF
