#!/usr/bin/env bash
# Seldon MLServer 1.7.1 for the serving benchmark (benchmarks/serving.py), in its own venv under
# build/peers/mlserver (never the project's .venv), then a check that it answers with in-process logits.
#
#   benchmarks/peers/setup_mlserver.sh
#
# The model is mlserver_runtime.py (the shared resnet18 state_dict, run with torch); settings.json and
# model-settings.json are written at each start by servers.py, with the benchmark's ports and batching.
# Pitfalls met:
# - uvloop is pinned to 0.21.0: with a later one MLServer's default worker process crash-loops.
# - parallel_workers is 0 (the model runs in the server process); MLServer's default of 1 adds a hop.
# - debug is false: its default (true) writes an access-log line per gRPC request.
# - MLServer's gRPC message limit is grpcio's 4 MB unless grpc_max_message_length is raised.
# - adaptive batching is silently off while max_batch_time is 0 (mlserver/batching/hooks.py).
# - MLServer unpacks raw_input_contents into Python lists of floats (mlserver/raw.py): its own cost.
source "$(dirname "$0")/common.sh"

VENV="$BUILD_DIR/mlserver/venv"
make_venv "$VENV"
pip_install "$VENV" mlserver==1.7.1 uvloop==0.21.0 "${TORCH_PINS[@]}"
make_weights
cd "$REPO_ROOT" && .venv/bin/python -m benchmarks.peers.check mlserver
