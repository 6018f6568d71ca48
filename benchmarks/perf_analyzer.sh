#!/usr/bin/env bash
# Profile a running slimserve with Triton's perf_analyzer (shipped in the tritonclient wheel's bin/).
#
#   benchmarks/perf_analyzer.sh [perf_analyzer args...]
#   benchmarks/perf_analyzer.sh -m digits -u localhost:8001 --concurrency-range 1:8:7
#   PROTOCOL=http benchmarks/perf_analyzer.sh -m digits -u localhost:8000 --concurrency-range 1:8:7
#
# PROTOCOL picks the transport: grpc (default, -i grpc against server.grpc_port) or http (-i http
# against the KServe v2 REST endpoint on server.http_port, binary tensors as tritonclient.http sends them).
# perf_analyzer needs Debian's libb64 and libcudart.so.12 (even on a CPU-only machine); this script
# installs the first with apt-get when it is missing and unpacks the second from the
# nvidia-cuda-runtime-cu12 wheel into build/cudart, then runs perf_analyzer.
set -euo pipefail
PROTOCOL=${PROTOCOL:-grpc}
case "$PROTOCOL" in
    grpc) DEFAULT_URL=localhost:8001 ;;
    http) DEFAULT_URL=localhost:8000 ;;
    *) echo "PROTOCOL must be grpc or http, got '$PROTOCOL'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
BIN=.venv/bin
CUDART_DIR=build/cudart

if ! ldconfig -p | grep -q libb64.so.0d; then
    echo "installing libb64-0d (Debian) for perf_analyzer" >&2
    apt-get update -qq && apt-get install -y -qq libb64-0d
fi
if [ ! -e "$CUDART_DIR/nvidia/cuda_runtime/lib/libcudart.so.12" ]; then
    echo "unpacking libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel into $CUDART_DIR" >&2
    mkdir -p "$CUDART_DIR"
    "$BIN/python" -m pip download --quiet --no-deps --dest "$CUDART_DIR" nvidia-cuda-runtime-cu12
    "$BIN/python" -m zipfile -e "$CUDART_DIR"/nvidia_cuda_runtime_cu12-*.whl "$CUDART_DIR"
fi
export LD_LIBRARY_PATH="$PWD/$CUDART_DIR/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$#" -eq 0 ]; then
    set -- -m digits -u "$DEFAULT_URL" --concurrency-range 1:8:7 --measurement-interval 3000
fi
exec "$BIN/perf_analyzer" -i "$PROTOCOL" "$@"
