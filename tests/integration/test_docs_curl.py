"""The curl examples in docs/protocol.md ("HTTP/REST") run against a real server and answer what they say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT
from tests.serving import ServerThread

DOC = REPO_ROOT / "docs" / "protocol.md"


def rest_examples() -> list[str]:
    """The commands of the first bash block under the doc's "HTTP/REST" heading, comments dropped."""
    section = DOC.read_text().split("## HTTP/REST", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "docs/protocol.md lost its curl examples"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_the_docs_have_curl_examples() -> None:
    commands = rest_examples()
    assert sum(command.startswith("curl ") for command in commands) >= 5


def test_curl_examples_run(digits_server: ServerThread, tmp_path: Path) -> None:
    if not any((Path(folder) / "curl").exists() for folder in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.fail("curl is not installed; the docs' examples need it (apt-get install curl)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    answers = {}
    for command in rest_examples():
        runnable = command.replace("localhost:8000", digits_server.http_address).replace("/tmp/", f"{tmp_path}/")
        done = subprocess.run(
            ["bash", "-c", runnable], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{command}\n{done.stdout!r}\n{done.stderr!r}"
        if command.startswith("curl "):
            answers[command] = json.loads(done.stdout)
    by_path = {re.search(r"(/v2/\S*)", command).group(1): answer for command, answer in answers.items()}  # type: ignore[union-attr]
    assert by_path["/v2/health/ready"] == {"ready": True}
    assert by_path["/v2/models/digits"]["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert by_path["/v2/models/digits/config"]["max_batch_size"] >= 8
    (logits,) = by_path["/v2/models/digits/infer"]["outputs"]
    assert logits["datatype"] == "BYTES" and logits["shape"] == [1, 3] and len(logits["data"]) == 3
    assert all(entry.count(":") == 2 for entry in logits["data"])  # "score:index:label"
    (image,) = by_path["/v2/models/digits/classify"]["results"]
    assert len(image["classes"]) == 2 and 0 <= image["classes"][0]["score"] <= 1
    assert by_path["/v2/models/digits/stats"]["model_stats"][0]["inference_count"] >= 2
