#!/bin/bash
# The prepared GPU check, one short script for a lent device machine (README "Performance").
#   here:  make gpu-wheels     # the pure-Python packages the device image lacks, into .gpu_wheels/
#   then:  the device tool's run with carry [".gpu_wheels"]:  bash scripts/device/gpu_check.sh
# Writes its JSON under $OUT (the device tool brings that folder back). The device image's own
# python3 holds torch, Lightning, torchvision, safetensors, rich and matplotlib; nothing can be
# downloaded there. One GPU: NCCL DDP across two GPUs is not part of it.
set -u
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu_wheels/* 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# 2:4 through PyTorch's semi-structured kernels against dense
timeout 120 python3 scripts/bench.py --only nm --device cuda --out "$OUT/bench_nm.json"
# training-step overhead, peak memory, speed-ups and search costs on the GPU, bf16 autocast
timeout 300 python3 scripts/bench.py --quick --device cuda --amp bf16 --out "$OUT/bench_cuda_bf16.json"
