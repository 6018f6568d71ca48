#!/usr/bin/env bash
# TorchServe 0.12 for the serving benchmark (benchmarks/serving.py), in its own venv under
# build/peers/torchserve (never the project's .venv): the model archive, the gRPC client stubs, then a
# check that it answers with in-process logits. Needs Java 17 (`java` on PATH).
#
#   benchmarks/peers/setup_torchserve.sh
#
# config.properties is written at each start by servers.py, with the benchmark's ports and batching.
# Pitfalls met:
# - token authorization is on by default since 0.11: --disable-token-auth (and the property).
# - the worker imports yaml (ts/utils/util.py) but the wheel does not depend on pyyaml: installed here.
# - without --ncs TorchServe restores its last config snapshot (ports, batch settings) on restart.
# - its default logging writes an access log, metrics and DEBUG/INFO lines for every request: the
#   benchmark starts it with --log-config torchserve_log4j2.xml (warnings only).
# - inference.proto is taken from the frontend jar (it ships there, not in the Python package); its
#   optional google.rpc.Status field is dropped for the client stubs, so the project's venv needs no
#   googleapis-common-protos (the field is not read; unknown fields are skipped on the wire).
# - the stubs are generated with the project's grpcio-tools: the load generator runs in the project's
#   venv for every server, with the same grpcio and protobuf.
source "$(dirname "$0")/common.sh"

ROOT="$BUILD_DIR/torchserve"
VENV="$ROOT/venv"
command -v java >/dev/null || { echo "TorchServe needs Java 17 (java not found)" >&2; exit 1; }
make_venv "$VENV"
pip_install "$VENV" 'torchserve==0.12.*' 'torch-model-archiver==0.12.*' pyyaml "${TORCH_PINS[@]}"
make_weights

mkdir -p "$ROOT/model-store" "$ROOT/stubs"
"$VENV/bin/torch-model-archiver" --force --model-name resnet18 --version 1.0 \
    --serialized-file "$WEIGHTS" --handler "$PEERS_DIR/torchserve_handler.py" \
    --extra-files "$PEERS_DIR/weights.py" --export-path "$ROOT/model-store"

JAR="$("$VENV/bin/python" -c 'import os, ts; print(os.path.join(os.path.dirname(ts.__file__), "frontend", "model-server.jar"))')"
"$VENV/bin/python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("proto/inference.proto"))' "$JAR" \
    | grep -v -e 'import "google/rpc/status.proto"' -e 'google.rpc.Status' >"$ROOT/stubs/inference.proto"
"$REPO_ROOT/.venv/bin/python" -m grpc_tools.protoc -I "$ROOT/stubs" --python_out="$ROOT/stubs" \
    --grpc_python_out="$ROOT/stubs" "$ROOT/stubs/inference.proto"
cd "$REPO_ROOT" && .venv/bin/python -m benchmarks.peers.check torchserve
