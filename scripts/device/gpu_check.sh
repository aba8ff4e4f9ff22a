#!/bin/bash
# The prepared GPU check, one short script for a lent device machine (README "Performance").
#   here:  make gpu-wheels     # the pure-Python packages the device image lacks, into .gpu_wheels/
#   then:  the device tool's run with carry [".gpu_wheels"]:  bash scripts/device/gpu_check.sh
# Writes its JSON under $OUT (the device tool brings that folder back). The device image's own
# python3 holds torch, Lightning, torchvision, safetensors, rich and matplotlib; nothing can be
# downloaded there. One GPU: NCCL DDP across two GPUs is not part of it. About 5 minutes in all
# (each step has its own timeout; a step cut short leaves the others' files).
set -u
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu_wheels/* 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# 2:4 through PyTorch's semi-structured kernels against dense
timeout 60 python3 scripts/bench.py --only nm --device cuda --out "$OUT/bench_nm.json"
# module.compile=true: the masked training step compiled vs eager, bf16
timeout 90 python3 scripts/bench.py --only compile --device cuda --amp bf16 --out "$OUT/bench_compile_cuda_bf16.json"
# the quick start as a GPU user runs it: fp32, bf16 (trainer=gpu), + data on the device, + compiled;
# train.wall_s of each in results.json (fp32 and bf16 train their own dense reference: precision is part of
# its key; on_device and compile are not)
for variant in "fp32:trainer=gpu trainer.precision=32-true" "bf16:trainer=gpu" \
               "bf16_on_device:trainer=gpu data.on_device=true" \
               "bf16_on_device_compiled:trainer=gpu data.on_device=true module.compile=true"; do
  name=${variant%%:*}
  timeout 90 python3 train.py experiment=quickstart ${variant#*:} paths.output_dir="$OUT/quickstart_$name" \
    paths.dense_dir="$OUT/dense" > "$OUT/quickstart_$name.log" 2>&1 || echo "quickstart $name failed"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); rows = {}
for run in sorted(out.glob("quickstart_*/results.json")):
    r = json.loads(run.read_text())
    rows[run.parent.name] = {k: r["train"].get(k) for k in ("wall_s", "steps", "precision", "compiled")} | \
        {"top1": r["pruned"]["top1"], "budget_met": r["budget_met"], "device": r["env"]["device"]}
(out / "gpu_check.json").write_text(json.dumps(rows, indent=2)); print(json.dumps(rows, indent=2))
PY
# training-step overhead, peak memory, speed-ups and search costs on the GPU, bf16 autocast (last: the longest)
timeout 120 python3 scripts/bench.py --quick --device cuda --amp bf16 --out "$OUT/bench_cuda_bf16.json"
