#!/usr/bin/env bash
# Make `prometheus` and `promtool` available: Debian's package, installed when missing.
# tests/integration/test_prometheus.py runs this; run it yourself to try deploy/prometheus/ locally.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian's prometheus package (for the metrics integration test)" >&2
# NOTE: the package's post-install tries to start the service; without systemd that is refused, harmlessly.
if ! $SUDO apt-get install -y --no-install-recommends prometheus >&2; then
  $SUDO apt-get update >&2
  $SUDO apt-get install -y --no-install-recommends prometheus >&2
fi
