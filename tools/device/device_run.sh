#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, by stage: CUDA tests, hardware profile,
# full-size synthetic mini (graphs vs eager, live chat capture), the policy benchmarks, the
# pinned-memory probe, layer-truncated flash (bench and disk tier).
# Usage: tools/device/device_run.sh WORKDIR OUTDIR STAGE
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
  timeout 200 python3 tools/device/chat_capture.py "$OUT" -- --model "$W/mini" --policy tide --vram 10 --gen-length 160
fi
if [ "$STAGE" = b ]; then
  echo "== gpu tests"; timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider 2>&1 | tail -4
  [ -d "$W/mini" ] || T synth "$W/mini" --preset mini 2>&1 | tail -1
  TO 500 bench -m "$W/mini" --vram 10,18 --policies resident,lru,static,tide --tau 4 \
    --workloads model,synthetic --prompts tools/bench/bench_prompts.txt --gen-length 128 \
    --profile h200 -o "$OUT/bench-mini.json" 2>&1 | tail -60
fi
if [ "$STAGE" = d ]; then
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  python3 -c "import json,sys;c=json.load(open(sys.argv[1]));print('layers',c['num_hidden_layers'],'experts',c['num_experts'])" "$W/mini/config.json"
  TO 330 bench -m "$W/mini" --vram 10,18 --policies resident,lru,static,tide --tau 4 \
    --workloads model,synthetic --prompts tools/bench/bench_prompts.txt --gen-length 128 \
    --profile h200 -o "$OUT/bench-mini.json" 2>&1 | tail -40
  TO 170 bench -m "$W/mini" --vram 10 --policies tide --tau 1,4 --misses cpu,gpu \
    --workloads synthetic --prompts tools/bench/bench_prompts.txt --gen-length 128 \
    --profile h200 -o "$OUT/bench-mini-misses.json" 2>&1 | tail -25
fi
if [ "$STAGE" = e ]; then
  echo "== gpu tests"; timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -k "misses or step_program" -p no:cacheprovider 2>&1 | tail -4
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  TO 300 bench -m "$W/mini" --vram 10 --policies resident,lru,tide --tau 1,4 --misses auto,gpu \
    --workloads synthetic --prompts tools/bench/bench_prompts.txt --gen-length 128 \
    --profile h200 -o "$OUT/bench-mini-sticky.json" 2>&1 | grep -v "^\[" | tail -30
fi
if [ "$STAGE" = f ]; then
  # pinned-memory reads from inside a step (zero-copy probe), then issue 8's tiered flash run
  echo "== uva probe"; timeout 120 python3 tools/bench/uva_probe.py "$OUT/uva.json" 2>&1 | tail -45
  echo "== synth flash --layers 4"; T synth "$W/flash4" --preset flash --layers 4 --force 2>&1 | tail -1
  du -sh "$W/flash4"
  # a quarter of the routed experts' bytes in RAM: 3 MoE layers x 256 x 24 MiB = 18 GiB -> 4.5
  for mode in cold warm; do
    echo "== tiered flash4 --ram 4.5 ($mode page cache)"
    python3 tools/bench/disk_run.py --$mode "$W/flash4" -- generate "Explain why the sky is blue to a ten-year-old." \
      -m "$W/flash4" --policy tide --vram 7.25 --ram 4.5 --gen-length 128 --json --no-live \
      > "$OUT/tiered-$mode.json" 2> "$OUT/tiered-$mode.err"; tail -3 "$OUT/tiered-$mode.err"
  done
  echo "== all in RAM"
  python3 tools/bench/disk_run.py --warm "$W/flash4" -- generate "Explain why the sky is blue to a ten-year-old." \
    -m "$W/flash4" --policy tide --vram 7.25 --gen-length 128 --json --no-live \
    > "$OUT/tiered-ram.json" 2> "$OUT/tiered-ram.err"; tail -3 "$OUT/tiered-ram.err"
fi
if [ "$STAGE" = g ]; then
  # streamed misses: GPU tests, then the policies on full-size mini
  echo "== gpu tests"; timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -8
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  B="bench -m $W/mini --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200"
  echo "== A: synthetic 10 GiB, stream, tau sweep"
  TO 200 $B --vram 10 --policies resident,lru,static,tide --misses stream --tau 1,2,4,8 \
    --workloads synthetic -o "$OUT/bench-stream-syn10.json" 2>&1 | grep -v "^\[" | tail -32
  echo "== C: model routing 10,18 GiB + synthetic 18"
  TO 200 $B --vram 10,18 --policies resident,lru,static,tide --misses stream --tau 1,4 \
    --workloads model,synthetic -o "$OUT/bench-stream-all.json" 2>&1 | grep -v "^\[" | tail -40
fi
if [ "$STAGE" = h ]; then
  # every policy on full-size mini, both budgets and workloads, one process (streamed misses)
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  TO 480 bench -m "$W/mini" --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200 \
    --vram 10,18 --policies resident,lru,static,tide --misses stream --tau 1 \
    --workloads model,synthetic -o "$OUT/bench-mini-stream.json" \
    2>&1 | grep -v "^\[" | tail -45
fi
if [ "$STAGE" = i ]; then
  echo "== gpu tests (streamed)"; timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k "streamed or device_view" -p no:cacheprovider 2>&1 | tail -4
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  TO 270 bench -m "$W/mini" --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200 \
    --vram 10,18 --policies resident,lru,tide --misses stream --tau 1 --workloads model,synthetic \
    -o "$OUT/bench-mini-fused.json" 2>&1 | grep -v "^\[" | tail -24
  rm -rf "$W/mini"
  T synth "$W/flash4" --preset flash --layers 4 --force 2>&1 | tail -1
  TO 200 bench -m "$W/flash4" --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile h200 \
    --vram 7.25 --policies resident,lru,static,tide --misses stream --tau 1 \
    --workloads model,synthetic -o "$OUT/bench-flash4.json" 2>&1 | grep -v "^\[" | tail -30
fi
if [ "$STAGE" = j ]; then
  # the planner against the measurement: uncalibrated plans, --calibrate at 10 GiB (saved, so
  # the bench's planned runs use it), then the synthetic workload with a τ sweep and the plan
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  for v in 10 18; do
    T plan -m "$W/mini" --profile h200 --vram $v --json > "$OUT/plan$v.json" 2>/dev/null
  done
  echo "== calibrate at 10 GiB"
  TO 200 plan -m "$W/mini" --profile h200 --vram 10 --calibrate --json > "$OUT/cal10.json" \
    2> "$OUT/cal10.err"; tail -22 "$OUT/cal10.err"
  TO 420 bench -m "$W/mini" --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200 \
    --vram 10,18 --policies resident,lru,tide --misses stream --tau plan,1,2,3,4,5,6,7,8 \
    --workloads synthetic -o "$OUT/bench-plan-syn.json" 2>&1 | grep -v "^\[" | tail -40
fi
if [ "$STAGE" = k ]; then
  echo "== gpu tests"; timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -4
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  echo "== calibrate at 18 GiB"
  TO 200 plan -m "$W/mini" --profile h200 --vram 18 --calibrate --json > "$OUT/cal18.json" \
    2> "$OUT/cal18.err"; tail -22 "$OUT/cal18.err"
  TO 300 bench -m "$W/mini" --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200 \
    --vram 10,18 --policies resident,lru,tide --misses stream --tau plan,1 \
    --workloads model,synthetic -o "$OUT/bench-plan-cal18.json" 2>&1 | grep -v "^\[" | tail -40
fi
if [ "$STAGE" = l ]; then
  # calibrate at one budget, predict both (synthetic workload): at 10 GiB, then at 18 GiB
  T synth "$W/mini" --preset mini --force 2>&1 | tail -1
  for c in 10 18; do
    echo "== calibrate at $c GiB"
    TO 200 plan -m "$W/mini" --profile h200 --vram $c --calibrate --json > "$OUT/cal$c.json" \
      2> "$OUT/cal$c.err"; grep -A4 "fitted" "$OUT/cal$c.err"
    TO 200 bench -m "$W/mini" --prompts tools/bench/bench_prompts.txt --gen-length 128 --profile h200 \
      --vram 10,18 --policies tide --misses stream --tau plan --workloads synthetic \
      -o "$OUT/bench-cal$c.json" 2>&1 | grep -A8 "planner against"
  done
fi
