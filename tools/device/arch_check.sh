#!/usr/bin/env bash
# GPU tests, then the same `tide bench` on full-size synthetic mini with the code before a change
# (a copy of the older tree in BEFORE) and with this tree, one after the other on one machine.
# Usage: tools/device/arch_check.sh WORKDIR OUTDIR BEFORE
set -u
W=$1; OUT=$2; BEFORE=$3
export PYTHONUNBUFFERED=1 TIDE_CACHE_DIR=$W/cache TIDE_CONFIG_DIR=$W/config
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== gpu tests"
timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_tiered.py -p no:cacheprovider 2>&1 | tail -8
PYTHONPATH=$PWD timeout 200 python3 -m tidecli synth "$W/mini" --preset mini 2>&1 | tail -1
head -1 tools/bench/bench_prompts.txt > "$W/p1.txt"
ARGS="bench -m $W/mini --vram 10 --policies resident,lru,tide --tau plan,1 --misses stream \
  --workloads model --prompts $W/p1.txt --gen-length 64 --profile h200"
for side in after before; do
  # the tree before the change wrote its JSON with `--json FILE`; this one with `-o FILE`
  src=$PWD; to=-o; [ $side = before ] && src=$BEFORE && to=--json
  echo "== bench ($side)"
  (cd "$src" && PYTHONPATH=$src timeout 400 python3 -m tidecli $ARGS $to "$OUT/$side.json" \
    2>&1 | grep -v "^\[" | tail -16)
done
echo "== resident step breakdown"
PYTHONPATH=$PWD timeout 200 python3 tools/bench/step_breakdown.py "$W/mini" --gen-length 128 \
  --out "$OUT" 2>&1 | tail -30
