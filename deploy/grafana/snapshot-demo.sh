#!/usr/bin/env bash
# Render docs/dashboard.png from real data: slimserve (the bundled digits model, its compressed
# variant from the cache) under load from slimserve-client bench, scraped by a real Prometheus with
# the shipped config and rules, drawn by render_snapshot.py. Run from the repository root:
#
#   deploy/grafana/snapshot-demo.sh [MINUTES]      # default 5
set -euo pipefail

MINUTES=${1:-5}
BIN=.venv/bin
WORK=$(mktemp -d)
GRPC=18001 METRICS=18002 PROM=19090
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$WORK"' EXIT

bash deploy/prometheus/ensure-prometheus.sh
$BIN/python - "$WORK/prometheus.yml" "$METRICS" <<'PY'
import sys, yaml, pathlib
config = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
config["global"].update(scrape_interval="5s", evaluation_interval="5s")
config["rule_files"] = [str(pathlib.Path("deploy/prometheus", f).resolve()) for f in config["rule_files"]]
config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{sys.argv[2]}"]}]
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY

$BIN/slimserve serve --host 127.0.0.1 --grpc-port $GRPC --http-port 0 --metrics-port $METRICS > "$WORK/slimserve.log" 2>&1 &
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address=127.0.0.1:$PROM > "$WORK/prometheus.log" 2>&1 &
until $BIN/python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
  sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:$GRPC')).Check(h.HealthCheckRequest(), timeout=1).status != h.HealthCheckResponse.SERVING)" 2>/dev/null; do
  sleep 1
done

SECONDS_TOTAL=$((MINUTES * 60))
# Mostly the default (compressed) variant, some pinned to the original, a trickle of bad requests.
$BIN/slimserve-client bench --address 127.0.0.1:$GRPC --concurrency 4 --duration $SECONDS_TOTAL --warmup 0 > /dev/null &
$BIN/slimserve-client bench --address 127.0.0.1:$GRPC --mode classify --image docs/seven.png \
  --concurrency 1 --duration $SECONDS_TOTAL --warmup 0 > /dev/null &
for _ in $(seq $((SECONDS_TOTAL / 10))); do
  $BIN/slimserve-client classify --address 127.0.0.1:$GRPC docs/seven.png --variant original > /dev/null || true
  $BIN/slimserve-client classify --address 127.0.0.1:$GRPC docs/seven.png --variant nonesuch > /dev/null 2>&1 || true
  sleep 10
done
sleep 5
$BIN/python deploy/grafana/render_snapshot.py --prometheus http://127.0.0.1:$PROM --minutes "$MINUTES" --out docs/dashboard.png
