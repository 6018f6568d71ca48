"""A small Dockerfile reader, so tests follow deploy/Dockerfile instead of copying its commands.

It understands what deploy/Dockerfile uses: comments, line continuations, ARG defaults, ENV ``k=v``
pairs, RUN (shell form, ``&&`` chains), COPY, EXPOSE, HEALTHCHECK, ENTRYPOINT and CMD (exec form).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.manifests import DEPLOY, REPO_ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def expand(text: str, variables: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as a shell would (unset = empty)."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def excluded_from_context(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; ``!`` re-includes.

    ``**/name`` matches ``name`` at any depth.
    """
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not keep
    return excluded


def shell_commands(run: str) -> list[str]:
    """The commands of one RUN (shell form), an ``&&`` chain split into its parts."""
    return [part.strip() for part in run.split("&&")]


def copy_arguments(copy: str) -> tuple[list[str], str]:
    """(sources relative to the build context, destination) of one COPY."""
    *sources, destination = shlex.split(copy)
    return sources, destination


def exec_form(value: str) -> list[str]:
    return list(json.loads(value)) if value.startswith("[") else shlex.split(value)


class Dockerfile:
    def __init__(self, path: Path = DOCKERFILE) -> None:
        self.instructions: list[Instruction] = []
        logical = ""
        for line in path.read_text().splitlines():
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):
                continue  # a comment inside a continued instruction
            logical += line.rstrip()
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            keyword, _, value = logical.strip().partition(" ")
            self.instructions.append(Instruction(keyword.upper(), " ".join(value.split())))
            logical = ""

    def values(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """Build arguments and their defaults."""
        pairs = (value.partition("=") for value in self.values("ARG"))
        return {name: default for name, has_default, default in pairs if has_default}

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The image's environment: ``base`` (the parent's), then each ENV in order, expanded."""
        env = dict(base)
        for value in self.values("ENV"):
            for pair in shlex.split(value):
                name, _, raw = pair.partition("=")
                env[name] = expand(raw, env)
        return env

    def run_commands(self) -> list[str]:
        """Every shell command of every RUN, in order."""
        return [command for value in self.values("RUN") for command in shell_commands(value)]

    def copies(self) -> list[tuple[list[str], str]]:
        return [copy_arguments(value) for value in self.values("COPY")]

    def exposed_ports(self) -> list[int]:
        return [int(port.split("/")[0]) for value in self.values("EXPOSE") for port in value.split()]

    def entrypoint(self) -> list[str]:
        return exec_form(self.values("ENTRYPOINT")[-1])

    def cmd(self) -> list[str]:
        return exec_form(self.values("CMD")[-1])

    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK's command (its options dropped)."""
        _, _, command = self.values("HEALTHCHECK")[-1].partition("CMD ")
        return exec_form(command)
