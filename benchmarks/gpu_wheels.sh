#!/usr/bin/env bash
# Here (with network): the Python packages slimserve needs that the GPU machine's image lacks or has too old,
# as Python 3.12 wheels, into build/gpu-wheels (ignored by git; name it in the device tool's `carry`).
# The image already holds torch, torchvision, numpy, onnx, onnxruntime, onnxscript, Pillow, PyYAML,
# matplotlib, scipy, pandas, scikit-learn, hypothesis, pytest and nvidia-ml-py (/work/.library/device/KINDS.md).
# aiohttp (the REST endpoint), OpenTelemetry (tracing) and tritonclient.http's geventhttpclient are added here too.
# Versions are the ones this checkout's .venv runs (the protos need protobuf >= 7.35 and grpcio >= 1.85.1).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=build/gpu-wheels
PACKAGES=(
    pydantic pydantic_core annotated-types typing-inspection typing_extensions
    grpcio grpcio-health-checking grpcio-reflection protobuf
    tritonclient python-rapidjson
    torchao torch-pruning mlxtend
    filelock prometheus_client
    aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
    opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common
    opentelemetry-exporter-otlp-common googleapis-common-protos
    geventhttpclient gevent greenlet zope.event zope.interface brotli certifi six
)
pattern="^($(IFS='|'; echo "${PACKAGES[*]}"))=="
mapfile -t pins < <(.venv/bin/python -m pip freeze | grep -i -E "$pattern")
if [ "${#pins[@]}" -ne "${#PACKAGES[@]}" ]; then
    echo "expected ${#PACKAGES[@]} pins in .venv, found ${#pins[@]}: ${pins[*]}" >&2
    exit 1
fi
rm -rf "$DEST" && mkdir -p "$DEST"
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"
du -sh "$DEST"
