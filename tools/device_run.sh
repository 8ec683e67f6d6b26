#!/usr/bin/env bash
# One device session: CUDA tests, hardware profile, full-size synthetic mini (graphs vs eager,
# live chat capture) and the policy benchmark. Usage: tools/device_run.sh WORKDIR OUTDIR STAGE
set -u
W=$1; OUT=$2; STAGE=$3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TIDE_CACHE_DIR=$W/cache TIDE_CONFIG_DIR=$W/config
mkdir -p "$W" "$OUT"
T() { python3 -m tidecli "$@"; }
TO() { local s=$1; shift; timeout "$s" python3 -m tidecli "$@"; }
if [ "$STAGE" = a ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "== gpu tests"; timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider 2>&1 | tail -6
  echo "== profile"; TO 200 profile -o "$OUT/profile-h200.json" > "$OUT/profile.txt" 2>&1; tail -40 "$OUT/profile.txt"
  echo "== synth mini"; T synth "$W/mini" --preset mini 2>&1 | tail -1
  for g in --graphs --no-graphs; do
    echo "== resident mini $g"
    TO 150 generate "Explain why the sky is blue to a ten-year-old." -m "$W/mini" \
      --gen-length 256 --json $g > "$OUT/gen$g.json" 2>/dev/null
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print({k:d.get(k) for k in ('tokens','steps','tokens_per_step','steps_per_second','tokens_per_second','wall_seconds','peak_allocated_bytes')})" "$OUT/gen$g.json"
  done
fi
if [ "$STAGE" = c ]; then
  [ -d "$W/mini" ] || T synth "$W/mini" --preset mini 2>&1 | tail -1
  echo "== chat capture (tide, 10 GiB)"
  timeout 200 python3 tools/chat_capture.py "$OUT" -- --model "$W/mini" --policy tide --vram 10 --gen-length 160
fi
if [ "$STAGE" = b ]; then
  echo "== gpu tests"; timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider 2>&1 | tail -4
  [ -d "$W/mini" ] || T synth "$W/mini" --preset mini 2>&1 | tail -1
  TO 500 bench -m "$W/mini" --vram 10,18 --policies resident,lru,static,tide --tau 4 \
    --workloads model,synthetic --prompts tools/bench_prompts.txt --gen-length 128 \
    --profile h200 --json "$OUT/bench-mini.json" 2>&1 | tail -60
fi
if [ "$STAGE" = d ]; then
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  python3 -c "import json,sys;c=json.load(open(sys.argv[1]));print('layers',c['num_hidden_layers'],'experts',c['num_experts'])" "$W/mini/config.json"
  TO 330 bench -m "$W/mini" --vram 10,18 --policies resident,lru,static,tide --tau 4 \
    --workloads model,synthetic --prompts tools/bench_prompts.txt --gen-length 128 \
    --profile h200 --json "$OUT/bench-mini.json" 2>&1 | tail -40
  TO 170 bench -m "$W/mini" --vram 10 --policies tide --tau 1,4 --misses cpu,gpu \
    --workloads synthetic --prompts tools/bench_prompts.txt --gen-length 128 \
    --profile h200 --json "$OUT/bench-mini-misses.json" 2>&1 | tail -25
fi
if [ "$STAGE" = e ]; then
  echo "== gpu tests"; timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -k "misses or step_program" -p no:cacheprovider 2>&1 | tail -4
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  TO 300 bench -m "$W/mini" --vram 10 --policies resident,lru,tide --tau 1,4 --misses auto,gpu \
    --workloads synthetic --prompts tools/bench_prompts.txt --gen-length 128 \
    --profile h200 --json "$OUT/bench-mini-sticky.json" 2>&1 | grep -v "^\[" | tail -30
fi
