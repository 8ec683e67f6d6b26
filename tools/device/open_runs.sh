#!/usr/bin/env bash
# GPU runs for the serve, compressed-experts and step issues, by stage (step1-3, trace: below):
#   serve  full-size synthetic mini behind `tide serve` at 10 GiB, tools/bench/serve_load.py
#   quant  every expert format on full-size mini, resident and tide at 10 and 6 GiB, one bench
#   ahead  GPU tests of the read-ahead, and a bench of it with stream and gpu misses
#   ab     the same bench on the tree in old.tar and on this one (before/after, one machine);
#          AB="bench options" replaces its run list
#   compile GPU tests of --compile and of the step program, then one bench with --compile off,on
#   kern   GPU tests of the pair-sort and routing kernels, then the ab stage
#   kern2  profiler traces of the resident (eager, compiled) and streamed steps, then ab
#   drift  lru and tide at 10 GiB on the synthetic and drifting workloads
#   planner  expert times captured and not, the int4 tiles bitwise, every miss mode against
#          the plan (a profile with the captured expert times), and 8 CPUs
#   verify the int4 tiles, captured expert times, the hand-off at the family's routing width,
#          and the plan's resident and streamed steps (eager, compiled) from that profile
#   quant4 bf16 and int4, resident and tide at 10 and 6 GiB, one bench
#   whole  before/after (old.tar) for bf16 and int4, resident and tide with every expert in a
#          slot and at 6 GiB; a profiler trace of int4 tide at 6 GiB; the GPU policy tests
#   fused  the compressed-expert GPU tests, then bf16 and int4 resident and tide at 40, 10 and
#          6 GiB, and int4 on the tree in old.tar (before/after)
#   last   int4 resident and tide at 10 and 6 GiB on this tree and old.tar; profiler traces of
#          bf16 resident and tide with every expert in a slot; the host-driven modes at 10 GiB
#   defer  bf16 resident and tide with every expert in a slot and at 10 GiB, this tree and
#          old.tar (before/after)
#   check  the GPU tests of the step, the streamed runtime and compressed experts, the
#          dequantizing kernel's whole pass per expert, then resident, lru and tide (stream,
#          cpu, split, gpu) at 10 and 6 GiB in one bench with the steps' own counters
#   gap    the host's share of the step (tools/bench/step_gap.py: resident in 1-8 graphs, tide
#          at 10 GiB), then resident, lru and tide in every miss mode at 10 GiB
#   hostplan resident, lru and tide in every miss mode at 10 and 6 GiB, their routing trace
#          (bench --traces); a profiler trace of gpu misses at 10 GiB; the fused pass per expert
#   final  GPU tests of the step program and policies; this machine's profile (tide profile
#          --quick); resident and tide (stream, cpu, gpu) at 10 GiB planned with it, this tree
#          and old.tar (before/after)
#   alt    tide with gpu and cpu misses at 10 GiB, this tree and old.tar alternating twice
#   calib  tide plan --calibrate at 10 GiB for cpu and gpu misses, then tide with both at 10
#          and 6 GiB planned with those corrections
#   host   before/after (host.tar) of the host-driven modes against the plan, 10 and 6 GiB
#   rows1  the GPU tests of the step, the streamed runtime, compressed experts and --compile;
#          the int4 tiles of the bitwise family at 32 tokens per expert (qkernel_bench --sweep32)
#   rows2  tide with cpu and split misses at 10 GiB, this tree and old.tar alternating twice
#   calib2 tide plan --calibrate at 10 GiB for cpu misses on this tree and on old.tar (its
#          measured steps against the bench's), then tide with cpu misses at 10 and 6 GiB
#          planned with this tree's corrections
#   calib3 tide plan --calibrate at 10 GiB for cpu, split and gpu misses, then tide with each at
#          10 and 6 GiB planned with those corrections
#   hosts  the GPU tests; tide in every host-driven miss mode at 10 GiB on 8 and 6 CPUs
#          (taskset), planned with the corrections calib3 saved
#   splitwhy tide with split misses at 10 GiB: as planned, with OMP_WAIT_POLICY=PASSIVE, with 8
#          CPU threads, beside gpu misses; a profiler trace of split misses
#   streams tide with gpu and split misses at 10 and 6 GiB, this tree and old.tar alternating
#          twice
#   alltests every GPU test (the step, the streamed runtime, compressed experts, --compile)
#   rows   every GPU test and LLaDA2.2's (ROWS_TESTS="files" replaces them); resident and
#          streamed tide at 10 GiB, this tree and old.tar alternating twice
#   autochk tide plan --calibrate at 10 GiB for cpu and gpu misses, then tide with --misses
#          auto beside every mode it chooses from, at 10 and at 6 GiB, planned with them
#   tauchk streamed tide at 10 and 6 GiB with the planned τ beside τ 2 and 4
#   autocompile the GPU tests of --compile; tide chat with its default (--compile auto) on a piped
#          prompt; resident and streamed tide at 10 GiB, eager and compiled
#   split2 tide plan --calibrate at 10 GiB for split and gpu misses, then both at 10 GiB on 16
#          CPUs and split on 8 and 6 (taskset), planned with those corrections
#   guess  GPU tests of the read-ahead; tide chat's start-up compile (one step); resident, lru
#          and streamed tide on the drifting workload at 10 and 6 GiB, the read-ahead off and
#          with its guess set to 100, 90, 70 and 50 % (--guess-accuracy)
#   guessc the same at 10 GiB, compiled
#   guess2 the same bench at 14 GiB (every expert of a step fits its slots), then profiler
#          traces of streamed tide on the drifting workload at 10 GiB, read-ahead off and right
#   guess3 after the read-ahead's join fix: its GPU tests; resident and streamed tide on the
#          drifting workload at 14 and 10 GiB, read-ahead off and with its guess set to 100 and
#          90 %; the same on the model's own routing at 10 GiB with the router's guess
#   guess4 the guess3 bench with near misses (--guess-misses ranked) at 95 and 90 %
#   overlap the read-ahead's GPU tests; tools/bench/overlap_probe.py (the grouped GEMM and a chain
#          of small kernels beside the gather kernel and beside copy-engine copies, 2 and 4
#          rows, 1-16 programs a row; an empty grouped pass, run and skipped by torch.cond)
#   ahead14 profiler traces on the drifting workload: resident, and streamed tide at 14 GiB with
#          the read-ahead off and with every guess right; each stream's kernels per step
#   plain  the GPU tests (the step, policies, compressed experts, LLaDA2.2, --compile), the fused
#          expert pass on bf16 experts against the unfused ops (qkernel_bench --only bf16) and
#          its tiles; full-size mini written meanwhile
#   plainab resident and streamed tide at 10 GiB, eager and compiled, on the tree in old.tar and
#          on this one; plainab14 the same at 14 GiB
#   plaintiles resident and streamed tide at 10 GiB, eager and compiled, with the plain pass's
#          small tiles as shipped and as in t32x128.tar and t16x128.tar (BM×BN), then again
#   stepahead GPU tests, then resident and streamed tide at 14 and 10 GiB on the drifting
#          workload with the read-ahead between steps off and on, guesses 100 % and 90 % right
#          (wrong ones: the experts ranked next), eager and compiled
#   stepahead2 at 14 GiB: no read-ahead, the layer read-ahead and the one between steps,
#          guesses 100 % and 95 % right (ranked), eager and compiled, one bench
#   stepahead3 GPU tests, then the read-ahead between steps off and on its own guess (the step
#          before's ranks) on the model's routing and the drifting workload, 14 and 10 GiB,
#          eager and compiled
#   stepahead4 at 14 GiB, eager: the read-ahead between steps off, on its own guess, and
#          (drifting) on a guess never right, which its gate soon turns off
#   through GPU tests (the step, policies, compressed experts, LLaDA2.2, --compile); resident and
#          streamed tide at 10 GiB, eager and compiled, with placed experts written into their
#          slots by the pass that reads them
#   throughab resident and streamed tide at 10 and 14 GiB, eager and compiled, on the tree in
#          old.tar and on this one
#   throughq the GPU tests of the two-source pass and of compressed experts (int4), then int4
#          resident and streamed tide at 6 GiB, eager, on the tree in old.tar and this one (run
#          with compressed experts written through as well: not kept, docs/benchmarks.md 26)
#   flash  layer-truncated flash at int4 with a quarter of its bf16 expert bytes in RAM, beside
#          bf16 with the disk tier
# Usage: tools/device/open_runs.sh WORKDIR OUTDIR STAGE  (the serve stage needs fastapi/uvicorn)
set -u
W=$1; OUT=$2; STAGE=$3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TIDE_CACHE_DIR=$W/cache TIDE_CONFIG_DIR=$W/config
mkdir -p "$W" "$OUT"
T() { python3 -m tidecli "$@"; }
TO() { local s=$1; shift; timeout "$s" python3 -m tidecli "$@"; }
PROMPT="Explain why the sky is blue to a ten-year-old."
mini() { [ -f "$W/mini/config.json" ] || { /usr/bin/time -f "synth mini: %e s" python3 -m tidecli synth "$W/mini" --preset mini 2>&1 | tail -2; }; }
calibrate() {  # $1 the JSON's name prefix, then miss modes: tide plan --calibrate at 10 GiB each
  local name=$1 m t0; shift
  for m in "$@"; do
    t0=$(date +%s)
    TO 100 plan -m "$W/mini" --profile h200 --vram 10 --misses $m --calibrate --json \
      > "$OUT/$name-$m.json" 2>"$W/cal-$m.err"; tail -1 "$W/cal-$m.err" | cut -c1-200
    python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['calibration']; \
print(sys.argv[2], c['measured']['steps'], round(c['measured']['step_ms'],2), c['scales'])" \
      "$OUT/$name-$m.json" $m | cut -c1-300
    echo "$m: $(( $(date +%s) - t0 )) s"
  done
}
wait_ready() {  # $1 url, $2 server pid: until /health answers (the port opens once the
  # model is loaded), or the server has exited
  python3 - "$1" "$2" <<'EOF'
import os, sys, time, urllib.request
for _ in range(150):
    try:
        os.kill(int(sys.argv[2]), 0)
    except OSError:
        sys.exit("server exited")
    try:
        print(urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).read().decode()); sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit("server not ready")
EOF
}
if [ "$STAGE" = serve ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  mini
  t0=$(date +%s)
  python3 -m tidecli serve -m "$W/mini" --policy tide --vram 10 --port 8000 > "$OUT/serve.log" 2>&1 &
  SP=$!
  wait_ready http://127.0.0.1:8000 $SP || { tail -20 "$OUT/serve.log"; exit 1; }
  echo "ready after $(( $(date +%s) - t0 )) s"
  for c in 1 4; do
    timeout 240 python3 tools/bench/serve_load.py --url http://127.0.0.1:8000 --clients $c \
      --requests 8 --max-tokens 128 --deadline 220 > "$OUT/serve-load-$c.json"
    cat "$OUT/serve-load-$c.json"; echo
  done
  python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())" \
    | grep -E '^tide_' | grep -v '_bucket' > "$OUT/serve-metrics.txt"; cat "$OUT/serve-metrics.txt" | head -40
  kill -INT $SP; timeout 30 tail --pid=$SP -f /dev/null; echo "server exit: $(wait $SP; echo $?)"
  tail -5 "$OUT/serve.log"
fi
if [ "$STAGE" = quant ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k \
    "read_ahead or streamed or capturing" 2>&1 | tail -3
  mini; df -h "$W" | tail -1
  TO 560 bench -m "$W/mini" --experts-dtype bf16,int8,fp8,int4 --policies resident,tide \
    --vram 10,6 --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/quant-bench-mini.json" 2>&1 | grep -v "^\[" | tail -45
  df -h "$W" | tail -1
fi
if [ "$STAGE" = flash ]; then
  rm -rf "$W/mini" "$W/cache"
  /usr/bin/time -f "synth flash4: %e s" python3 -m tidecli synth "$W/flash4" --preset flash --layers 4 2>&1 | tail -2
  # 3 MoE layers x 256 experts x 24 MiB = 18 GiB of bf16 experts: a quarter is 4.5 GiB
  for fmt in int4 bf16; do
    echo "== $fmt --ram 4.5"
    python3 tools/bench/disk_run.py --warm "$W/flash4" -- generate "$PROMPT" -m "$W/flash4" \
      --policy tide --vram 7.25 --ram 4.5 --experts-dtype $fmt --gen-length 128 --json --no-live \
      > "$OUT/flash4-$fmt-ram4.5.json" 2> "$OUT/flash4-$fmt.err"; tail -3 "$OUT/flash4-$fmt.err"
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));s=d['expert_stats']['summary'];print({k:d.get(k) for k in ('steps_per_second','tokens_per_second','misses','experts_per_layer')}, {k:s.get(k) for k in ('hit_rate','disk_reads','bytes_disk','bytes_h2d')}, d['host_store'].get('tiers'))" "$OUT/flash4-$fmt-ram4.5.json"
  done
fi
if [ "$STAGE" = step1 ]; then  # issue: every miss mode's step against the plan, one bench
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  TO 330 bench -m "$W/mini" --policies resident,lru,tide --misses stream,cpu,split,gpu \
    --vram 10,6 --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/step-bench-mini.json" 2>&1 | grep -v "^\[" | tail -40
  timeout 150 python3 tools/bench/step_breakdown.py "$W/mini" --gen-length 64 --out "$OUT" \
    2>&1 | tail -30
fi
if [ "$STAGE" = step2 ]; then  # the consumer host settings, the profile, the VRAM peak
  for n in 8 6; do
    echo "== taskset $n CPUs"
    timeout 150 taskset -c 0-$((n - 1)) python3 -m tidecli bench -m "$W/mini" --policies tide \
      --misses stream,cpu,split,gpu --vram 10 --workloads model --cpu-threads $n \
      --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile h200 \
      -o "$OUT/step-bench-mini-cpus$n.json" 2>&1 | grep -v "^\[" | tail -14
  done
  TO 150 profile -m "$W/mini" -o "$OUT/h200-profile.json" --no-save 2>&1 | tail -12
  timeout 120 python3 tools/bench/vram_peak.py "$OUT/vram-int4-6.pickle" -- generate \
    "$PROMPT" -m "$W/mini" --policy tide --vram 6 --experts-dtype int4 --gen-length 64 \
    --no-live --json > "$OUT/vram-int4-6.json" 2> "$OUT/vram-int4-6.err"; tail -3 "$OUT/vram-int4-6.err"
  ls -la "$OUT"
fi
if [ "$STAGE" = step3 ]; then  # the planner with the measured host hand-off, every miss mode
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  TO 200 profile -m "$W/mini" -o "$OUT/h200-profile.json" --no-save 2>&1 | tail -6
  P=$OUT/h200-profile.json
  TO 280 bench -m "$W/mini" --policies resident,tide --misses auto,stream,cpu,split,gpu \
    --vram 10,6 --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile "$P" -o "$OUT/step-bench-mini-handoff.json" 2>&1 | grep -v "^\[" | tail -34
  for n in 8 6; do
    echo "== taskset $n CPUs"
    timeout 100 taskset -c 0-$((n - 1)) python3 -m tidecli bench -m "$W/mini" --policies tide \
      --misses auto,stream,cpu,split,gpu --vram 10 --workloads model --profile "$P" \
      --prompts tools/bench/bench_prompts.txt --gen-length 64 \
      -o "$OUT/step-bench-mini-handoff-cpus$n.json" 2>&1 | grep -v "^\[" | sed -n '/planner against/,/profile /p'
  done
fi
if [ "$STAGE" = ahead ]; then  # read-ahead (--prefetch layer) and gpu misses' copy stream
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k \
    "read_ahead or streamed or misses_on_the_gpu or capturing or step_program" 2>&1 | tail -4
  mini
  TO 330 bench -m "$W/mini" --policies resident,lru,tide --misses stream,gpu \
    --prefetch off,layer --vram 10,6 --workloads model \
    --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/ahead-bench-mini.json" 2>&1 | grep -v "^\[" | tail -30
fi
if [ "$STAGE" = kern2 ]; then  # profiler traces of the resident and streamed steps, then ab
  mini
  for run in "resident on" "resident off" "tide on"; do
    set -- $run
    timeout 100 python3 tools/bench/step_trace.py "$W/mini" --policy $1 --misses stream \
      --vram 10 --compile $2 --out "$OUT" > "$OUT/trace-$1-$2.txt" 2>&1
    head -1 "$OUT/trace-$1-$2.txt" | cut -c1-200
  done
  STAGE=ab
fi
if [ "$STAGE" = kern ]; then  # the pair-sort and routing kernels: GPU tests, then before/after
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_gpu.py \
    -k "grouped_mm or route_kernel or compiled or step_program or streamed or capturing" \
    2>&1 | tail -4
  STAGE=ab
fi
if [ "$STAGE" = ab ]; then  # before/after in one run: the tree in old.tar (`git archive REV
  # -o old.tar`, left untracked), then this one, the same bench on the same machine
  mini
  mkdir -p "$W/old" && tar -xf old.tar -C "$W/old"
  for tree in old new; do
    dir=$PWD; [ $tree = old ] && dir=$W/old
    # shellcheck disable=SC2086
    (cd "$dir" && PYTHONPATH=$dir timeout 250 python3 -m tidecli bench -m "$W/mini" \
      ${AB:---policies resident,lru,tide --misses stream,gpu --vram 10,6} --workloads model \
      --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile h200 \
      -o "$OUT/ab-$tree.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,/more per run/p')
  done
fi
# tree_bench TREE SECONDS NAME BENCH-OPTIONS...: `tide bench` on this tree (TREE new) or on the
# one in TREE.tar (left untracked: `git archive REV -o old.tar`), with the workload every
# before/after run shares, into $OUT/NAME-TREE.json
tree_bench() {
  local tree=$1 dir=$PWD
  if [ "$tree" != new ]; then dir=$W/$tree; mkdir -p "$dir" && tar -xf "$tree.tar" -C "$dir"; fi
  (cd "$dir" && PYTHONPATH=$dir timeout "$2" python3 -m tidecli bench -m "$W/mini" "${@:4}" \
    --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile "${PROFILE:-h200}" \
    -o "$OUT/$3-$tree.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,$p' | cut -c1-170)
}
if [ "$STAGE" = whole ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  mini
  for tree in new old; do
    tree_bench $tree 200 whole --experts-dtype bf16,int4 --policies resident,tide --vram 40,6 \
      --repeat 2
  done
  timeout 90 python3 tools/bench/step_trace.py "$W/mini" --misses stream --vram 6 \
    --experts-dtype int4 --out "$OUT" > "$OUT/trace-int4-6.txt" 2>&1
  head -40 "$OUT/trace-int4-6.txt" | cut -c1-220
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant.py \
    -k "policies or misses_on_the_gpu or every_policy" 2>&1 | tail -3
fi
if [ "$STAGE" = fused ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_quant.py tests/test_gpu.py \
    -k "quant or tiles or policies or misses_on_the_gpu or streamed or capturing" 2>&1 | tail -4
  mini
  tree_bench new 270 fused --experts-dtype bf16,int4 --policies resident,tide --vram 40,10,6 \
    --repeat 2
  tree_bench old 110 fused --experts-dtype int4 --policies resident,tide --vram 10,6 --repeat 2
fi
if [ "$STAGE" = last ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  mini
  for tree in new old; do
    tree_bench $tree 200 int4 --experts-dtype int4 --policies resident,tide --vram 10,6 --repeat 2
  done
  for run in "resident 40" "tide 40"; do
    set -- $run
    timeout 70 python3 tools/bench/step_trace.py "$W/mini" --policy $1 --misses stream \
      --vram $2 --out "$OUT" > "$OUT/trace-bf16-$1-$2.txt" 2>&1
    sed -n 3p "$OUT/trace-bf16-$1-$2.txt" | cut -c1-200
  done
  tree_bench new 100 host --policies tide --misses cpu,split,gpu --vram 10 --repeat 2
fi
if [ "$STAGE" = defer ]; then
  mini
  for tree in new old; do
    tree_bench $tree 95 defer --policies resident,tide --vram 40,10 --repeat 2
  done
fi
if [ "$STAGE" = check ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant.py \
    tests/test_compile.py 2>&1 | tail -4
  timeout 90 python3 tools/bench/qkernel_bench.py "$OUT/qkernel-pass.json" | grep "'pinned': False"
  mini
  tree_bench new 300 check --policies resident,lru,tide --misses stream,cpu,split,gpu \
    --vram 10,6 --repeat 2
fi
if [ "$STAGE" = gap ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  timeout 140 python3 tools/bench/step_gap.py "$W/mini" --pieces 1,2,4,8 -o "$OUT/gap-resident.json"
  timeout 100 python3 tools/bench/step_gap.py "$W/mini" --policy tide --vram 10 \
    -o "$OUT/gap-tide.json"
  tree_bench new 240 hostmodes --policies resident,lru,tide --misses stream,cpu,split,gpu --vram 10
fi
if [ "$STAGE" = hostplan ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  tree_bench new 330 hostplan --policies resident,lru,tide --misses stream,cpu,split,gpu \
    --vram 10,6 --traces "$OUT"
  timeout 100 python3 tools/bench/step_trace.py "$W/mini" --misses gpu --vram 10 --out "$OUT" \
    > "$OUT/trace-gpu-10.txt" 2>&1
  head -3 "$OUT/trace-gpu-10.txt" | cut -c1-300
  timeout 90 python3 tools/bench/qkernel_bench.py "$OUT/qkernel-pass.json" | grep "'pinned': False"
fi
if [ "$STAGE" = final ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "program or policies or streamed or misses_on_the_gpu or capturing" 2>&1 | tail -3
  mini
  timeout 150 python3 -m tidecli profile --quick --no-save -o "$OUT/profile-here.json" 2>&1 | tail -2
  for tree in new old; do
    PROFILE=$OUT/profile-here.json tree_bench $tree 160 final --policies resident,tide \
      --misses stream,cpu,gpu --vram 10
  done
fi
# alternate NAME SECONDS BENCH-OPTIONS...: tree_bench on this tree and old.tar, alternating
# twice, into $OUT/NAME1-new.json … NAME4-old.json
alternate() {
  mini
  local i=0 tree
  for tree in new old new old; do
    i=$((i + 1))
    tree_bench $tree "$2" "$1$i" "${@:3}" | grep "│ model"
  done
}
if [ "$STAGE" = alt ]; then  # host-driven misses alternating this tree and old.tar
  alternate alt 110 --policies tide --misses gpu,cpu --vram 10
fi
if [ "$STAGE" = calib ]; then  # calibrated at 10 GiB, then planned at 10 and 6 GiB
  mini
  for m in cpu gpu; do
    TO 100 plan -m "$W/mini" --profile h200 --vram 10 --misses $m --calibrate \
      -o "$OUT/calibrate-$m.json" 2>&1 | grep -i "warning\|corrected\|saved" | cut -c1-200
  done
  tree_bench new 200 calib --policies tide --misses cpu,gpu --vram 10,6
fi
if [ "$STAGE" = rows1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant.py \
    tests/test_compile.py 2>&1 | tail -4
  timeout 300 python3 tools/bench/qkernel_bench.py "$OUT/qkernel-sweep32.json" --sweep32 int4 \
    | grep -v "'equal': True" | tail -45
fi
if [ "$STAGE" = rows2 ]; then
  alternate rows 125 --policies tide --misses cpu,split --vram 10
fi
if [ "$STAGE" = calib2 ]; then
  mini
  mkdir -p "$W/old" && tar -xf old.tar -C "$W/old"
  for tree in old new; do
    dir=$PWD; [ $tree = old ] && dir=$W/old
    (cd "$dir" && PYTHONPATH=$dir TIDE_CONFIG_DIR=$W/config-$tree timeout 110 python3 -m tidecli \
      plan -m "$W/mini" --profile h200 --vram 10 --misses cpu --calibrate --json \
      > "$OUT/calibrate2-cpu-$tree.json" 2>"$W/cal-$tree.err"; tail -2 "$W/cal-$tree.err" | cut -c1-200)
    python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['calibration']; \
print(sys.argv[2], c['measured']['steps'], round(c['measured']['step_ms'],2), c['scales'])" \
      "$OUT/calibrate2-cpu-$tree.json" $tree | cut -c1-300
  done
  (export TIDE_CONFIG_DIR=$W/config-new; tree_bench new 230 calib2 --policies tide --misses cpu --vram 10,6)
fi
if [ "$STAGE" = calib3 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  export TIDE_CONFIG_DIR=$W/config-cal
  calibrate calibrate3 cpu split gpu
  tree_bench new 330 calib3 --policies tide --misses cpu,split,gpu --vram 10,6
fi
if [ "$STAGE" = hosts ]; then
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant.py \
    tests/test_compile.py > "$OUT/gputests.txt" 2>&1; tail -4 "$OUT/gputests.txt"
  mini
  export TIDE_CONFIG_DIR=$W/config-cal
  for n in 8 6; do
    echo "== taskset $n CPUs"
    timeout 140 taskset -c 0-$((n - 1)) python3 -m tidecli bench -m "$W/mini" --policies tide \
      --misses cpu,split,gpu --vram 10 --workloads model --cpu-threads $n --profile h200 \
      --prompts tools/bench/bench_prompts.txt --gen-length 64 -o "$OUT/hosts-cpus$n.json" 2>&1 \
      | grep -v "^\[" | sed -n '/tide bench/,$p' | cut -c1-170
  done
fi
if [ "$STAGE" = splitwhy ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch; print(torch.__config__.parallel_info())" | grep -i "openmp\|threads"
  mini
  tree_bench new 100 split-gpu --policies tide --misses gpu,split --vram 10 | grep "│ model"
  (export OMP_WAIT_POLICY=PASSIVE; tree_bench new 100 split-passive --policies tide \
    --misses gpu,split --vram 10 | grep "│ model")
  tree_bench new 100 split-threads8 --policies tide --misses split --vram 10 --cpu-threads 8 \
    | grep "│ model"
  timeout 100 python3 tools/bench/step_trace.py "$W/mini" --misses split --vram 10 --out "$OUT" \
    > "$OUT/trace-split-10.txt" 2>&1
  head -45 "$OUT/trace-split-10.txt" | cut -c1-220
fi
if [ "$STAGE" = streams ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  alternate streams 115 --policies tide --misses gpu,split --vram 10,6
fi
if [ "$STAGE" = alltests ]; then
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant.py \
    tests/test_compile.py > "$OUT/gputests.txt" 2>&1; tail -4 "$OUT/gputests.txt"
fi
if [ "$STAGE" = rows ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 250 python3 -m pytest -q -p no:cacheprovider ${ROWS_TESTS:-tests/test_gpu.py \
    tests/test_gpu_quant.py tests/test_compile.py tests/test_gpu22.py} > "$OUT/gputests.txt" 2>&1
  tail -4 "$OUT/gputests.txt"
  alternate rows 90 --policies resident,tide --misses stream --vram 10
fi
if [ "$STAGE" = autochk ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  export TIDE_CONFIG_DIR=$W/config-cal
  calibrate calibrate-auto cpu gpu
  TO 30 plan -m "$W/mini" --profile h200 --vram 10 --misses auto 2>&1 | tail -4 | cut -c1-200
  for v in 10 6; do
    tree_bench new 170 "autochk$v" --policies tide --misses auto,stream,cpu,gpu --vram $v \
      | grep "│ model\|auto runs"
  done
fi
if [ "$STAGE" = tauchk ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  tree_bench new 400 tauchk --policies tide --misses stream --tau plan,2,4 --vram 10,6 \
    | grep "│ model"
fi
if [ "$STAGE" = split2 ]; then  # split and gpu misses calibrated, then on 16, 8 and 6 CPUs
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  export TIDE_CONFIG_DIR=$W/config-cal
  calibrate calibrate-split2 split gpu
  tree_bench new 120 split2-cpus16 --policies tide --misses split,gpu --vram 10 | grep "│ model"
  for n in 8 6; do
    echo "== taskset $n CPUs"
    timeout 100 taskset -c 0-$((n - 1)) python3 -m tidecli bench -m "$W/mini" --policies tide \
      --misses split --vram 10 --workloads model --cpu-threads $n --profile h200 \
      --prompts tools/bench/bench_prompts.txt --gen-length 64 -o "$OUT/split2-cpus$n.json" 2>&1 \
      | grep "│ model" | cut -c1-170
  done
fi
if [ "$STAGE" = autocompile ]; then  # chat's default --compile auto on a GPU, then eager/compiled
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_gpu.py \
    > "$OUT/gputests.txt" 2>&1; tail -3 "$OUT/gputests.txt"
  mini
  t0=$(date +%s)
  printf 'Why is the sky blue?\n' | timeout 150 python3 -m tidecli chat -m "$W/mini" --vram 10 \
    --gen-length 64 --no-live > "$OUT/chat-auto.out" 2> "$OUT/chat-auto.err"
  echo "chat rc=$? in $(( $(date +%s) - t0 )) s"; grep -v "^\s*$" "$OUT/chat-auto.err" | tail -8 | cut -c1-200
  tree_bench new 260 compiled --policies resident,tide --misses stream --vram 10 \
    --compile off,on | grep "│ model"
fi
if [ "$STAGE" = guess ] || [ "$STAGE" = guessc ] || [ "$STAGE" = guess2 ] || \
   [ "$STAGE" = guess3 ] || [ "$STAGE" = guess4 ]; then  # read-ahead, set guesses
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  G() { TO "$1" bench -m "$W/mini" --policies resident,lru,tide --misses stream \
    --prefetch off,layer --guess-accuracy 1,0.9,0.7,0.5 --workloads drifting \
    --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile h200 "${@:2}" 2>&1 \
    | grep -v "^\[" | sed -n '/tide bench/,/more per run/p' | cut -c1-160; }
fi
if [ "$STAGE" = guess ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k \
    "read_ahead or set_guess" > "$OUT/gputests.txt" 2>&1; tail -3 "$OUT/gputests.txt"
  t0=$(date +%s)
  printf 'Why is the sky blue?\n' | timeout 150 python3 -m tidecli chat -m "$W/mini" --vram 10 \
    --gen-length 64 --no-live > "$OUT/chat-auto.out" 2> "$OUT/chat-auto.err"
  echo "chat rc=$? in $(( $(date +%s) - t0 )) s"; grep -v "^\s*$" "$OUT/chat-auto.err" | tail -6 | cut -c1-200
  G 420 --vram 10,6 -o "$OUT/guess-bench-mini.json"
fi
if [ "$STAGE" = guess3 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k \
    "read_ahead or set_guess or step_program" 2>&1 | tail -1
  G 300 --vram 14,10 --policies resident,tide --guess-accuracy 1,0.9 \
    -o "$OUT/guess3-bench-mini.json"
  TO 150 bench -m "$W/mini" --policies resident,tide --misses stream --prefetch off,layer \
    --vram 10 --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/guess3-model-bench-mini.json" 2>&1 | grep "│ model"
fi
if [ "$STAGE" = stepahead ]; then  # the read-ahead between steps, by the copy engine
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  (mini > "$W/synth.txt" 2>&1 &)
  python3 -c "import torch; torch.cuda.Event(external=True); print('torch', torch.__version__)"
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "read_ahead or set_guess or every_policy" > "$OUT/stepahead-tests.txt" 2>&1
  tail -3 "$OUT/stepahead-tests.txt"
  sleep 5; while pgrep -f "tidecli synth" > /dev/null; do sleep 2; done; cat "$W/synth.txt"
  TO 460 bench -m "$W/mini" --policies resident,tide --misses stream --prefetch off,step \
    --guess-accuracy 1,0.9 --guess-misses ranked --workloads drifting --vram 14,10 --prompts \
    tools/bench/bench_prompts.txt --gen-length 64 --profile h200 --compile off,on \
    -o "$OUT/stepahead-bench-mini.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,$p' | cut -c1-170
fi
if [ "$STAGE" = stepahead2 ]; then  # both read-aheads side by side at 14 GiB
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  mini
  TO 500 bench -m "$W/mini" --policies resident,tide --misses stream --prefetch off,layer,step \
    --guess-accuracy 1,0.95 --guess-misses ranked --workloads drifting --vram 14 --prompts \
    tools/bench/bench_prompts.txt --gen-length 64 --profile h200 --compile off,on \
    -o "$OUT/stepahead2-bench-mini.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,/more per/p' | cut -c1-170
fi
if [ "$STAGE" = stepahead3 ]; then  # the read-ahead between steps on its own guess
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  (mini > "$W/synth.txt" 2>&1 &)
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "read_ahead or set_guess or every_policy" > "$OUT/stepahead3-tests.txt" 2>&1
  tail -3 "$OUT/stepahead3-tests.txt"
  sleep 5; while pgrep -f "tidecli synth" > /dev/null; do sleep 2; done; cat "$W/synth.txt"
  TO 440 bench -m "$W/mini" --policies resident,tide --misses stream --prefetch off,step \
    --workloads model,drifting --vram 14,10 --prompts tools/bench/bench_prompts.txt \
    --gen-length 64 --profile h200 --compile off,on -o "$OUT/stepahead3-bench-mini.json" 2>&1 \
    | grep -v "^\[" | sed -n '/tide bench/,/more per/p' | cut -c1-170
fi
if [ "$STAGE" = stepahead4 ]; then  # the fixed cost of the read-ahead between steps
  mini
  TO 300 bench -m "$W/mini" --policies resident,tide --misses stream --prefetch off,step \
    --guess-accuracy 0 --workloads model,drifting --vram 14 --prompts \
    tools/bench/bench_prompts.txt --gen-length 64 --profile h200 \
    -o "$OUT/stepahead4-bench-mini.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,/more per/p' | cut -c1-170
fi
if [ "$STAGE" = guess4 ]; then
  G 300 --vram 14,10 --policies resident,tide --guess-accuracy 1,0.95,0.9 \
    --guess-misses ranked -o "$OUT/guess4-bench-mini.json"
fi
if [ "$STAGE" = guess2 ]; then
  [ -n "${SKIP_TESTS:-}" ] || timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k set_guess 2>&1 | tail -1
  G 200 --vram 14 --policies resident,tide -o "$OUT/guess-bench-mini-14.json"
  for a in "" "--prefetch layer --guess-accuracy 1"; do
    timeout 100 python3 tools/bench/step_trace.py "$W/mini" --misses stream --vram 10 \
      --workload drifting $a --out "$OUT" | head -1
  done
fi
if [ "$STAGE" = overlap ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k \
    "read_ahead or set_guess" 2>&1 | tail -1
  timeout 120 python3 tools/bench/overlap_probe.py "$OUT/overlap.json" --rows 2,4 \
    --programs 1,4,16
fi
if [ "$STAGE" = plain ]; then
  (mini > "$W/synth.txt" 2>&1 &)  # written while the tests run
  timeout 320 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu22.py \
    tests/test_gpu_quant.py tests/test_compile.py -k "not pinned_store" > "$OUT/plain-tests.txt" 2>&1
  tail -4 "$OUT/plain-tests.txt"
  timeout 100 python3 tools/bench/qkernel_bench.py "$OUT/plain-pass.json" --only bf16 \
    | cut -c1-150
  timeout 120 python3 tools/bench/qkernel_bench.py "$OUT/plain-sweep.json" --sweep --only bf16 \
    | python3 -c "import sys,ast; rs=[ast.literal_eval(l) for l in sys.stdin if l.startswith('{')]; \
[print(r['pinned'], r['tokens_per_expert'], r['bm'], r['bn'], r['warps'], r['stages'], r['us_per_expert']) \
 for r in sorted(rs, key=lambda r: (r['pinned'], r['tokens_per_expert'], r['us_per_expert']))]"
  while pgrep -f "tidecli synth" > /dev/null; do sleep 2; done; cat "$W/synth.txt"
fi
if [ "$STAGE" = plainab ]; then
  mini
  for tree in old new; do
    t0=$(date +%s)
    tree_bench $tree 280 plain --policies resident,tide --misses stream --vram 10 --compile off,on
    echo "$tree: $(( $(date +%s) - t0 )) s"
  done
fi
if [ "$STAGE" = through ]; then  # one two-source pass writes placed experts into their slots
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  (mini > "$W/synth.txt" 2>&1 &)  # written while the tests run
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu22.py \
    tests/test_gpu_quant.py tests/test_compile.py -k "not pinned_store" > "$OUT/through-tests.txt" 2>&1
  tail -4 "$OUT/through-tests.txt"
  sleep 2; while pgrep -f "tidecli synth" > /dev/null; do sleep 2; done; cat "$W/synth.txt"
  tree_bench new 200 through --policies resident,tide --misses stream --vram 10 --compile off,on
fi
if [ "$STAGE" = throughab ]; then
  mini
  for tree in old new; do
    tree_bench $tree 290 throughab --policies resident,tide --misses stream --vram 10,14 \
      --compile off,on
  done
fi
if [ "$STAGE" = throughq ]; then  # compressed experts written through too
  (mini > "$W/synth.txt" 2>&1 &)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_quant.py tests/test_gpu.py \
    -k "int4 or two_source or streamed_misses" > "$OUT/throughq-tests.txt" 2>&1
  tail -3 "$OUT/throughq-tests.txt"
  sleep 2; while pgrep -f "tidecli synth" > /dev/null; do sleep 2; done; cat "$W/synth.txt"
  for tree in old new; do
    tree_bench $tree 160 throughq --experts-dtype int4 --policies resident,tide --misses stream \
      --vram 6
  done
fi
if [ "$STAGE" = plainab14 ]; then
  mini
  for tree in old new; do
    tree_bench $tree 280 plain14 --policies resident,tide --misses stream --vram 14 \
      --compile off,on
  done
fi
if [ "$STAGE" = plaintiles ]; then  # the plain pass's small tiles: t32x128.tar, t16x128.tar
  mini
  for tree in new t32x128 t16x128 new; do
    t0=$(date +%s); name=tiles; [ -f "$OUT/tiles-new.json" ] && [ $tree = new ] && name=tiles2
    tree_bench $tree 200 $name --policies resident,tide --misses stream --vram 10 \
      --compile off,on | grep "│ model"
    echo "$tree: $(( $(date +%s) - t0 )) s"
  done
fi
if [ "$STAGE" = ahead14 ]; then
  mini
  for a in "--policy resident" "--misses stream --vram 14" \
           "--misses stream --vram 14 --prefetch layer --guess-accuracy 1"; do
    timeout 150 python3 tools/bench/step_trace.py "$W/mini" $a --workload drifting --out "$OUT" \
      > "$W/t.txt" 2>&1; grep -m1 '^{"misses"' "$W/t.txt" | cut -c1-120
    n=$(grep -m1 '^{"misses"' "$W/t.txt" | python3 -c "import json,sys; print(json.load(sys.stdin)['steps'])")
    f=$(ls -t "$OUT"/trace-*.json.gz | head -1)
    python3 tools/bench/trace_gaps.py "$f" --steps "$n" --kernels 14 --top 3 > "$f.gaps.json"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['per_step']); \
[print(k['stream'], k['busy_ms'], k['events'], *k['top'], sep='\n  ') for k in r['kernels']]" "$f.gaps.json"
  done
fi
if [ "$STAGE" = guessc ]; then
  G 500 --vram 10 --compile on -o "$OUT/guess-compiled-bench-mini.json"
fi
if [ "$STAGE" = host ]; then
  mini
  for tree in new host; do
    tree_bench $tree 200 host --policies tide --misses stream,cpu,split,gpu --vram 10,6
  done
fi
if [ "$STAGE" = gputests ]; then  # the step program's GPU tests, --compile's among them
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_gpu.py \
    -k "compiled or step_program or streamed or misses_on_the_gpu or read_ahead or capturing" \
    2>&1 | tail -4
fi
if [ "$STAGE" = compile ]; then  # the compiled step against the eager one, one bench
  mini
  TO 560 bench -m "$W/mini" --policies resident,lru,tide --misses stream --vram 10,6 \
    --compile off,on --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/compile-bench-mini.json" 2>&1 | grep -v "^\[" | tail -30
fi
if [ "$STAGE" = drift ]; then  # the two synthetic workloads (random and drifting entries)
  mini
  TO 280 bench -m "$W/mini" --policies lru,tide --vram 10 --workloads synthetic,drifting \
    --prompts tools/bench/bench_prompts.txt --gen-length 64 --profile h200 \
    -o "$OUT/drift-bench-mini.json" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,/more per run/p'
fi
if [ "$STAGE" = trace ]; then  # where a host-driven step's time goes (torch.profiler)
  mini
  for m in gpu cpu stream; do
    timeout 120 python3 tools/bench/step_trace.py "$W/mini" --misses $m --vram 10 --out "$OUT" \
      > "$OUT/trace-$m.txt" 2>&1; head -3 "$OUT/trace-$m.txt" | cut -c1-300
  done
  ls -la "$OUT"
fi
if [ "$STAGE" = planner ]; then  # expert times captured, the int4 tiles, every mode vs the plan
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_quant.py tests/test_gpu.py \
    -k "quant or tiles or captured" 2>&1 | tail -3
  timeout 90 python3 tools/bench/qkernel_bench.py "$OUT/qkernel-bitwise.json" --bitwise \
    | grep -v "'equal': True" | tail -30
  timeout 60 python3 tools/bench/expert_time_probe.py "$OUT/expert-time.json" \
    --profile profiles/h200.json --write "$OUT/h200-captured.json"
  mini
  P=$OUT/h200-captured.json
  B() { TO "$1" bench -m "$W/mini" --workloads model --prompts tools/bench/bench_prompts.txt \
    --gen-length 64 --profile "$P" "${@:2}" 2>&1 | grep -v "^\[" | sed -n '/tide bench/,$p' | cut -c1-160; }
  B 200 --policies resident,lru,tide --misses stream --vram 10,6 -o "$OUT/plan-stream.json"
  B 170 --policies tide --misses cpu,split,gpu --vram 10,6 -o "$OUT/plan-host.json"
  echo "== taskset 8 CPUs"
  timeout 110 taskset -c 0-7 python3 -m tidecli bench -m "$W/mini" --policies tide \
    --misses stream,cpu,split,gpu --vram 10 --workloads model --cpu-threads 8 --profile "$P" \
    --prompts tools/bench/bench_prompts.txt --gen-length 64 -o "$OUT/plan-cpus8.json" 2>&1 \
    | grep -v "^\[" | sed -n '/planner against/,$p' | cut -c1-160
fi
if [ "$STAGE" = verify ]; then  # the int4 tiles, captured expert times, the hand-off's width,
  # and the plan's resident and streamed steps, eager and compiled, from the captured profile
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_quant.py tests/test_gpu.py \
    -k "tiles or every_policy or captured or streamed" 2>&1 | tail -3
  timeout 60 python3 tools/bench/qkernel_bench.py "$OUT/qkernel-tiles.json" | grep "'pinned': False"
  timeout 60 python3 tools/bench/expert_time_probe.py "$OUT/expert-time2.json" \
    --profile profiles/h200.json --write "$W/h200-captured.json" | grep -v "^wrote"
  timeout 200 python3 tools/bench/handoff_probe.py "$OUT/handoff.json" cuda
  python3 - "$W/h200-captured.json" "$OUT/handoff.json" "$OUT/h200-v2.json" <<'PY'
import json, sys
prof = json.load(open(sys.argv[1]))
prof["host_layer_ms"] = json.load(open(sys.argv[2]))["routing"]["family"]["ms_per_moe_layer"]
json.dump(prof, open(sys.argv[3], "w"), indent=1)
PY
  mini
  P=$OUT/h200-v2.json
  B() { TO "$1" bench -m "$W/mini" --workloads model --prompts tools/bench/bench_prompts.txt \
    --gen-length 64 --profile "$P" "${@:2}" 2>&1 | grep -v "^\[" \
    | sed -n '/planner against/,/with this workload/p' | cut -c1-160; }
  B 200 --policies resident,tide --misses stream --vram 10 --compile off,on -o "$OUT/verify-10.json"
  B 100 --policies resident,tide --misses stream --vram 6 -o "$OUT/verify-6.json"
fi
if [ "$STAGE" = quant4 ]; then  # bf16 and int4 with the decoding tiles, resident and tide
  mini
  TO 480 bench -m "$W/mini" --experts-dtype bf16,int4 --policies resident,tide --vram 10,6 \
    --workloads model --prompts tools/bench/bench_prompts.txt --gen-length 64 \
    --profile h200 -o "$OUT/quant4-bench-mini.json" 2>&1 | grep -v "^\[" | tail -30
fi
