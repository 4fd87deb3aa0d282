#!/usr/bin/env bash
# Issue 19's GPU check in one device call (about 5 minutes on an H200): tunegap's LoRA against TRL's SFTTrainer
# with its defaults and without gradient checkpointing, the default architecture with random weights, 64 x 512.
#   make gpu-wheels                                  # here: TRL and datasets as wheels (the device has no TRL)
#   device run: bash benchmarks/gpu_check.sh         # carry [".whl"]; results come back under $OUT
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee -a "$out/gpu.txt"
timeout 480 python3 benchmarks/vs_trl.py --gpu-suite --json "$out/vs_trl-gpu.json" 2>&1 | tee "$out/vs_trl-gpu.log"
