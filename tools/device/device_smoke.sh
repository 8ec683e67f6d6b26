#!/usr/bin/env bash
# GPU smoke run: CUDA tests, microbenchmarks, synth defaults, full-size mini step breakdown.
# Usage: tools/device/device_smoke.sh WORKDIR OUTDIR
set -u
WORK=$1; OUT=$2
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current,driver_version --format=csv
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core" ; grep -o -w -E "avx2|avx512f|avx512_bf16|amx_bf16|amx_tile" /proc/cpuinfo | sort | uniq -c
free -g; df -h "$WORK" | tail -1
python3 -c "import torch,transformers,safetensors;print('torch',torch.__version__,'transformers',transformers.__version__,'safetensors',safetensors.__version__)"
echo "== gpu tests"; timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -x 2>&1 | tail -25
echo "== gpu checks"; timeout 150 python3 tools/bench/gpu_checks.py --out "$OUT" 2>&1 | tail -60
echo "== logit scale"; timeout 150 python3 tools/bench/logit_scale.py "$WORK" --preset mini --layers 3 --scales 8,16,24 2>&1 | tail -12
echo "== synth full mini"; /usr/bin/time -v python3 -c "
from tidecli.model.synth import write_checkpoint
write_checkpoint('$WORK/mini', preset='mini', force=True)" 2>&1 | grep -E "Elapsed|Maximum resident|Error|error" 
du -sh "$WORK/mini"
echo "== step breakdown"; timeout 200 python3 tools/bench/step_breakdown.py "$WORK/mini" --gen-length 128 --out "$OUT" 2>&1 | tail -40
