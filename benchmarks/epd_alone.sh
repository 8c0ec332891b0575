#!/usr/bin/env bash
# epd serve alone, driven by the same client and workload as ../shared/peers/vllm_cpu/compare.sh, with where the
# CPU went: per-process CPU seconds (/proc/PID/stat; the client's over its main run only, not its start-up) and
# the instances' per-stage forward-pass seconds and pass counts (/metrics), read before and after the run. For A/B
# runs of one epd change without restarting vLLM. The ratio against vLLM still comes only from compare.sh (one
# run for both systems).
#   benchmarks/epd_alone.sh MODEL_DIR SIZE PROMPTS CONCURRENCY [EPD_SERVE_ARGS...]
# Needs the vLLM-CPU venv of setup.sh for its client (VLLM_CPU_VENV, default /tmp/vllm-cpu); run from the root.
set -u
M=$(cd "$1" && pwd); SIZE=$2; N=$3; C=$4; shift 4
V=${VLLM_CPU_VENV:-/tmp/vllm-cpu}; OUT=${OUT:-/tmp/epd-alone-$(date +%s)}; mkdir -p "$OUT"
[ -x "$V/bin/vllm" ] || { echo "no vLLM-CPU client in $V: run ../shared/peers/vllm_cpu/setup.sh"; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
.venv/bin/epd serve "$M" --host 127.0.0.1 --port "$P" "$@" > "$OUT/epd.log" 2>&1 &
EP=$!
trap 'kill -INT $EP 2>/dev/null; sleep 5; kill -KILL $EP 2>/dev/null' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$P/health" >/dev/null && break; sleep 1; done
name=$(curl -s "http://127.0.0.1:$P/v1/models" | python3 -c 'import json,sys;print(json.load(sys.stdin)["data"][0]["id"])')
cpu() { for p in $EP $(pgrep -P $EP); do echo "$p $(awk '{print $14+$15}' /proc/$p/stat) $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-60)"; done; }
cpu > "$OUT/cpu0"; curl -s "http://127.0.0.1:$P/metrics" > "$OUT/metrics0.txt"
PYTHONUNBUFFERED=1 "$V/bin/vllm" bench serve --backend openai-chat --endpoint /v1/chat/completions \
  --base-url "http://127.0.0.1:$P" --model "$name" --tokenizer "$M" --dataset-name random-mm --num-prompts "$N" --seed 0 \
  --random-input-len 16 --random-output-len 32 --random-range-ratio 0 \
  --random-mm-base-items-per-request 1 --random-mm-num-mm-items-range-ratio 0 \
  --random-mm-limit-mm-per-prompt '{"image":1,"video":0}' --random-mm-bucket-config "{($SIZE, $SIZE, 1): 1.0}" \
  --ignore-eos --temperature 0 --request-rate inf --max-concurrency "$C" --percentile-metrics ttft,tpot,e2el \
  --metric-percentiles 50,90,99 --save-result --result-dir "$OUT" --result-filename epd.json > "$OUT/bench.log" 2>&1 &
CP=$!; c0=; c1=  # the client's CPU ticks from its main run's start (not its start-up) to its last reading
while kill -0 $CP 2>/dev/null; do
  t=$(awk '{print $14+$15}' /proc/$CP/stat 2>/dev/null) || break
  [ -z "$c0" ] && grep -q "Starting main benchmark" "$OUT/bench.log" && c0=$t
  c1=$t; sleep 0.2
done
wait $CP; echo "${c0:-$c1} $c1" > "$OUT/client_cpu"
cpu > "$OUT/cpu1"; curl -s "http://127.0.0.1:$P/metrics" > "$OUT/metrics1.txt"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from benchmarks.planner_validate import parse_stage_totals, stage_delta
out = Path(sys.argv[1])
r = json.loads((out / "epd.json").read_text())
print({k: round(r[k], 2) for k in ["completed", "request_throughput", "median_ttft_ms", "p90_ttft_ms",
                                   "median_tpot_ms", "p90_tpot_ms"]})
before = {l.split()[0]: float(l.split()[1]) for l in open(out / "cpu0") if len(l.split()) > 2}
for line in open(out / "cpu1"):
    pid, ticks, *cmd = line.split()
    if pid in before:
        print(f"cpu {(float(ticks) - before[pid]) / 100:6.1f} s  {' '.join(cmd)[:60]}")
c0, c1 = (float(x) for x in (out / "client_cpu").read_text().split())
print(f"cpu {(c1 - c0) / 100:6.1f} s  the client (vllm bench serve), its main run")
s0, s1 = (parse_stage_totals((out / f"metrics{i}.txt").read_text()) for i in (0, 1))
for inst, stages in sorted(stage_delta(s0, s1).items()):
    for stage, (passes, secs) in sorted(stages.items()):
        print(f"{inst} {stage:8s} {secs:7.2f} s in {passes} passes")
PY
echo "results in $OUT"
