#!/usr/bin/env bash
# Every GPU test (but the server's, which needs its extra), then a short `tide bench` on a
# layer-truncated synthetic LLaDA2.2-flash: the 48-expert bound under resident, lru and tide.
# Usage: tools/device/final_check.sh WORKDIR OUTDIR
set -u
W=$1; OUT=$2
export PYTHONUNBUFFERED=1 TIDE_CACHE_DIR=$W/cache TIDE_CONFIG_DIR=$W/config
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
echo "== gpu tests"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu22.py \
  tests/test_gpu_quant.py tests/test_tiered.py -p no:cacheprovider 2>&1 | tail -12 \
  | tee "$OUT/gpu_tests.txt"
echo "== flash22, 2 layers"
head -1 tools/bench/bench_prompts.txt > "$W/p1.txt"
PYTHONPATH=$PWD timeout 100 bash -c "python3 -m tidecli synth '$W/f22' --preset flash22 \
  --layers 2 2>&1 | tail -1 && python3 -m tidecli bench -m '$W/f22' \
  --experts-per-layer 24,48,64 --policies resident,lru,tide --tau 1,4 --workloads model \
  --prompts '$W/p1.txt' --gen-length 32 --profile h200 -o '$OUT/bench-flash22-2l-h200.json' \
  2>&1 | grep -v '^\[' | tail -24" | tee "$OUT/bench22.txt"
