#!/usr/bin/env bash
# GPU runs for the serve, compressed-experts and step issues, by stage:
#   serve  full-size synthetic mini behind `tide serve` at 10 GiB, tools/bench/serve_load.py
#   quant  every expert format on full-size mini, resident and tide at 10 and 6 GiB, one bench
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
