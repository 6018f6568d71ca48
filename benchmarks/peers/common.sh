# Shared by the peer setup scripts: paths, and a venv outside the project's .venv.
# Sourced, not run. Everything a peer needs lives under build/peers/ (git-ignored).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="$REPO_ROOT/benchmarks/peers"
BUILD_DIR="$REPO_ROOT/build/peers"
WEIGHTS="$BUILD_DIR/resnet18.pt"
PYTHON="${PYTHON:-python3}"
# NOTE: exactly the project's torch: pip then takes it from this machine's local wheels; any other
# version downloads gigabytes.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

# make_venv DIR: a fresh-enough venv at DIR with an up-to-date pip.
make_venv() {
    local venv="$1"
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
}

# pip_install VENV ARGS...: quiet pip install into VENV.
pip_install() {
    local venv="$1"
    shift
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

# make_weights: the seed-fixed random resnet18 state_dict every server loads (written once).
make_weights() {
    mkdir -p "$BUILD_DIR"
    "$REPO_ROOT/.venv/bin/python" "$PEERS_DIR/weights.py" "$WEIGHTS"
}
