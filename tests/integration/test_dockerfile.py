"""deploy/Dockerfile's commands, run in a fresh virtual environment (this machine has no Docker engine).

The Dockerfile is read, not copied: its image paths (/opt, /src, /etc, /var, /home, /tmp) are moved
under a temporary root, its ENV becomes the environment, then every RUN command runs in order (COPY
copies from the repository, honouring .dockerignore), except those that need root in an image
(apt-get, user and group creation, chown). Two stand-ins, both for download size: the venv is created
without pip and a .pth file makes the project venv's packages (torch among them) visible, so the
pinned torch line finds its requirements satisfied instead of downloading about 5 GB; it runs with
``--build-arg TORCH_INDEX_URL=https://pypi.org/simple`` (the CUDA build, the one installed here).
The project itself is installed from the copied sources exactly as written (``pip install /src``).
Then the ENTRYPOINT and CMD serve the digits model, and the HEALTHCHECK command probes it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from benchmarks.common import free_port, wait_ready
from compression.models.digits.data import load_splits, normalize
from server.config.settings import ServerSettings, load_config
from tests.compressed_digits import seed_trained_digits
from tests.conftest import digits_without_compression
from tests.dockerfile import (
    DOCKERFILE,
    Dockerfile,
    copy_arguments,
    dockerignore_patterns,
    excluded_from_context,
    expand,
    shell_commands,
)
from tests.manifests import REPO_ROOT

pytestmark = pytest.mark.slow

IMAGE_PATH = re.compile(r"(?<![\w.$}/-])/(opt|src|etc|var|home|tmp)\b")
NEEDS_ROOT = {"apt-get", "groupadd", "useradd", "chown"}
BUILD_ARGS = {"TORCH_INDEX_URL": "https://pypi.org/simple"}


@dataclass
class Build:
    root: Path
    dockerfile: Dockerfile
    env: dict[str, str]
    skipped: list[str] = field(default_factory=list)

    @property
    def venv(self) -> Path:
        return Path(self.env["VIRTUAL_ENV"])

    @property
    def workdir(self) -> Path:
        """The image's WORKDIR: where its processes start (never the repository, whose sources would shadow)."""
        workdir = Path(self.dockerfile.values("WORKDIR")[-1])
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir


def copy_into_image(build: Build, copy: str) -> None:
    """COPY from the build context (the repository, less .dockerignore) into the image root."""
    sources, destination = copy_arguments(copy)
    patterns = dockerignore_patterns()

    def outside_context(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(REPO_ROOT)
        return {name for name in names if excluded_from_context(str(relative / name), patterns)}

    for source in sources:
        assert not excluded_from_context(source, patterns), f"COPY {source}: excluded by .dockerignore"
        path = REPO_ROOT / source
        target = Path(destination) / path.name if destination.endswith("/") else Path(destination)
        if path.is_dir():
            shutil.copytree(path, target, ignore=outside_context)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def run_command(build: Build, command: str) -> None:
    words = shlex.split(expand(command, {**build.dockerfile.args(), **BUILD_ARGS, **build.env}))
    if words[0] in NEEDS_ROOT:
        build.skipped.append(command)
        return
    if words[:3] == ["python", "-m", "venv"]:
        # NOTE: without pip, so the project venv's pip and setuptools (on the .pth path) are used, not
        # ensurepip's older setuptools, which would make pip fetch a newer one for torch.
        run_checked([sys.executable, "-m", "venv", "--without-pip", *words[3:]], build)
        site = Path(sysconfig.get_paths(vars={"base": words[-1], "platbase": words[-1]})["purelib"])
        site.joinpath("_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        return
    if words[0] == "pip":
        words = [str(build.venv / "bin" / "python"), "-m", "pip", *words[1:]]
    for word in words:
        if word.startswith("/") and words[0] in {"rm", "mkdir"}:
            assert word.startswith(str(build.root)), f"{command!r} would touch {word} outside the image root"
    run_checked(words, build)


def run_checked(command: list[str], build: Build) -> None:
    """Run a RUN command from the image's root folder, as ``docker build`` does before any WORKDIR."""
    result = subprocess.run(command, env=build.env, cwd=build.root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The image, built in a temporary root by running the Dockerfile's own commands."""
    root = tmp_path_factory.mktemp("image")
    rebased = root / "Dockerfile"
    rebased.write_text(IMAGE_PATH.sub(lambda m: f"{root}/{m.group(1)}", DOCKERFILE.read_text()))
    dockerfile = Dockerfile(rebased)
    base = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    image = Build(root, dockerfile, dockerfile.env(base))
    for instruction in dockerfile.instructions:
        if instruction.keyword == "RUN":
            for command in shell_commands(instruction.value):
                run_command(image, command)
        elif instruction.keyword == "COPY":
            copy_into_image(image, instruction.value)
    return image


def test_only_root_only_commands_were_skipped(build: Build) -> None:
    assert {shlex.split(c)[0] for c in build.skipped} == NEEDS_ROOT


def test_the_project_is_installed_into_the_image_venv(build: Build) -> None:
    python = build.venv / "bin" / "python"
    probe = "from importlib import metadata as m, util as u; print(u.find_spec('server').origin, m.version('torch'))"
    out = subprocess.run(
        [python, "-c", probe], env=build.env, cwd=build.workdir, capture_output=True, text=True, check=True
    ).stdout
    server_file, torch_version = out.split()
    assert server_file.startswith(str(build.venv)), server_file  # the copy `pip install /src` installed
    assert torch_version.startswith("2.14.1")
    assert not (build.root / "src").exists()  # removed after installing, as in the image


def test_entry_point_is_the_installed_console_script(build: Build) -> None:
    entrypoint = build.dockerfile.entrypoint()
    assert shutil.which(entrypoint[0], path=build.env["PATH"]) == str(build.venv / "bin" / entrypoint[0])
    result = subprocess.run(
        [*entrypoint, "serve", "--help"], env=build.env, cwd=build.workdir, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--config" in result.stdout


def healthcheck(build: Build) -> subprocess.CompletedProcess[str]:
    command = build.dockerfile.healthcheck()
    return subprocess.run(command, env=build.env, cwd=build.workdir, capture_output=True, text=True, timeout=60)


def test_cmd_serves_and_healthcheck_follows_it(build: Build) -> None:
    command = [*build.dockerfile.entrypoint(), *build.dockerfile.cmd()]
    config_path = Path(command[command.index("--config") + 1])
    assert load_config(config_path).models[0].name == "digits"  # the image's default config, as COPYed
    grpc_port, metrics_port = free_port(), free_port()
    config = digits_without_compression()
    server = ServerSettings(host="127.0.0.1", grpc_port=grpc_port, http_port=free_port(), metrics_port=metrics_port)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config.model_copy(update={"server": server}).model_dump(mode="json")))
    cache_dir = Path(build.env["SLIMSERVE_CACHE_DIR"])  # the config names none: the image's ENV decides
    seed_trained_digits(cache_dir)
    log = (build.root / "serve.log").open("wb")
    process = subprocess.Popen(command, env=build.env, cwd=build.workdir, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{grpc_port}"
    try:
        wait_ready(address, process, timeout_s=300)
        probe = healthcheck(build)
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr

        split = load_splits()["test"]
        tensor = triton.InferInput("input", [8, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(normalize(split.images[:8]))
        logits = triton.InferenceServerClient(address).infer("digits", [tensor]).as_numpy("logits")
        assert np.mean(logits.argmax(axis=1) == split.labels[:8]) >= 0.75
    finally:
        process.terminate()
        code = process.wait(timeout=60)
        log.close()
    assert code == 0, (build.root / "serve.log").read_text()[-3000:]
    assert healthcheck(build).returncode == 1  # nothing serving any more
    assert any(cache_dir.joinpath("digits").iterdir())
