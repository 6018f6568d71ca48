"""slimserve's tests: ``unit/`` mirrors the source packages (no sockets, tiny models); ``integration/`` starts
real servers on loopback; ``gpu/`` needs CUDA."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository's root folder."""
