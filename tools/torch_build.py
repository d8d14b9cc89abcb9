#!/usr/bin/env python3
"""Which torch build `make install` installs, from tools/torch-builds.txt and the build variables LocalAI sets.

LocalAI builds a Python backend by running `make` in its folder with the hardware in the environment: BUILD_TYPE
(empty or cpu, cublas, hipblas, intel, l4t, mps), CUDA_MAJOR_VERSION (the 12 or 13 of cublas and l4t) and, in its
own scripts, BUILD_PROFILE (the two combined, e.g. cublas12; it wins when set). TORCH_INDEX_URL, when set (even
to nothing, meaning PyPI's default), replaces the table's index and nothing else.

Standard library only: the Makefile runs this with the system python, before the venv exists.

    show                              print the choice (key=value lines) and why
    record PATH                       write the choice to PATH only if it changed (the install stamp depends on it)
    install --python PY --record PATH pip-install torch into PY's venv; on failure say why and how to fix it
    requirements                      print requirements.txt with its torch pin set to the choice's version
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE = HERE / "torch-builds.txt"
REQUIREMENTS = HERE.parent / "requirements.txt"
RECORDED = HERE.parent / ".venv" / ".torch-build"  # the build the venv holds (the Makefile's $(TORCH_BUILD))
# Build types whose number comes from CUDA_MAJOR_VERSION, the way LocalAI composes BUILD_PROFILE from the two.
CUDA_FAMILIES = ("cublas", "l4t")
DEFAULT_CUDA_MAJOR = "12"
FROM_REQUIREMENTS = "requirements.txt"
PYPI = "pypi"
DEPS = ("no-deps", "with-deps")
TORCH_PIN = re.compile(r"^torch==([^\s;#]+)")


class BuildError(Exception):
    """The build cannot be chosen; the message names the cause and the fix."""


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    build: str
    torch: str
    deps: str
    index: str
    what: str


@dataclass(frozen=True)
class Choice:
    """What gets installed, and the words that explain why."""

    build: str
    what: str
    index_url: str  # "" = PyPI's default index
    torch: str
    with_deps: bool
    asked: str  # the variables that chose it, e.g. "BUILD_TYPE=cublas, CUDA_MAJOR_VERSION=12"
    source: str  # where torch comes from, in words

    @property
    def why(self) -> str:
        """The one line the install prints."""
        return f"torch build: {self.what} ({self.asked}) from {self.source}, torch {self.torch}"

    def record(self) -> str:
        """What decides the installed torch (not how it was asked for), one `key=value` a line."""
        deps = DEPS[self.with_deps]
        return f"build={self.build}\nindex_url={self.index_url}\ntorch={self.torch}\ndeps={deps}\n"


def read_table(path: Path = TABLE) -> dict[str, Row]:
    """The table's rows by build type; `#` starts a comment line."""
    rows: dict[str, Row] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 4)
        if len(fields) != 5 or fields[2] not in DEPS:
            raise BuildError(f"{path}:{number}: expected `build torch deps index what` (deps: no-deps or with-deps)")
        rows[fields[0]] = Row(*fields)
    return rows


def requirements_pin(path: Path = REQUIREMENTS) -> str:
    """The version in requirements.txt's `torch==VERSION` line."""
    for line in path.read_text().splitlines():
        match = TORCH_PIN.match(line.strip())
        if match:
            return match.group(1)
    raise BuildError(f"{path} has no `torch==VERSION` line; put torch's pin back there")


def known_builds(rows: Mapping[str, Row]) -> str:
    """The build types the table knows, as an install error lists them."""
    names: list[str] = []
    for name in sorted(set(rows) | set(CUDA_FAMILIES)):
        if name in CUDA_FAMILIES:
            majors = sorted(key[len(name) :] for key in rows if key.startswith(name) and key[len(name) :].isdigit())
            if majors:
                names.append(f"{name} (with CUDA_MAJOR_VERSION {' or '.join(majors)}; {DEFAULT_CUDA_MAJOR} when unset)")
        elif name == "cpu":
            names.append("cpu (or empty)")
        else:
            names.append(name)
    return ", ".join(names)


def choose(env: Mapping[str, str], rows: Mapping[str, Row] | None = None, pin: str | None = None) -> Choice:
    """The torch build that `env` (BUILD_PROFILE, BUILD_TYPE, CUDA_MAJOR_VERSION, TORCH_INDEX_URL) asks for."""
    rows = read_table() if rows is None else rows
    profile = env.get("BUILD_PROFILE", "").strip()
    build_type = env.get("BUILD_TYPE", "").strip()
    cuda = env.get("CUDA_MAJOR_VERSION", "").strip()
    if profile:
        name, asked = profile.lower(), [f"BUILD_PROFILE={profile}"]
        if build_type:
            asked[0] += f", which wins over BUILD_TYPE={build_type}"
    elif build_type:
        name, asked = build_type.lower(), [f"BUILD_TYPE={build_type}"]
    else:
        name, asked = "cpu", ["no BUILD_TYPE: the default"]
    if name in CUDA_FAMILIES:
        asked.append(f"CUDA_MAJOR_VERSION={cuda}" if cuda else f"no CUDA_MAJOR_VERSION: {DEFAULT_CUDA_MAJOR}")
        name += cuda or DEFAULT_CUDA_MAJOR
    override = env.get("TORCH_INDEX_URL")
    row = rows.get(name)
    what = row.what if row else name
    if row is None:
        if override is None:
            raise BuildError(
                f"unknown build type '{name}' ({', '.join(asked)}).\n"
                f"Known build types: {known_builds(rows)}.\n"
                "Fix: set BUILD_TYPE to one of them, or set TORCH_INDEX_URL to the index to take torch from "
                "(the table of builds is tools/torch-builds.txt)."
            )
        # A build type we do not know, with an index the user chose: the default build's torch from that index.
        row = rows["cpu"]
        asked.append("not in the table: the cpu build's torch version and deps")
    table_url = "" if row.index == PYPI else row.index
    if override is None:
        index_url = table_url
        source = index_url or "PyPI's default index"
    else:
        index_url = override.strip()
        chosen, table_source = index_url or "PyPI's default index", table_url or "PyPI's default index"
        source = f"{chosen} (TORCH_INDEX_URL; the table says {table_source})"
    torch = (pin or requirements_pin()) if row.torch == FROM_REQUIREMENTS else row.torch
    return Choice(
        build=name,
        what=what,
        index_url=index_url,
        torch=torch,
        with_deps=row.deps == "with-deps",
        asked=", ".join(asked),
        source=source,
    )


def choose_for_venv(env: Mapping[str, str], rows: Mapping[str, Row], recorded: Path) -> Choice:
    """`choose`, except that a make with no hardware variables at all keeps the build the venv already has: after
    `BUILD_TYPE=cublas make`, a plain `make run` or `make test` must not put the CPU build back."""
    asked_for = any(env.get(k, "").strip() for k in ("BUILD_TYPE", "BUILD_PROFILE")) or "TORCH_INDEX_URL" in env
    if not asked_for and recorded.is_file():
        fields = dict(line.split("=", 1) for line in recorded.read_text().splitlines() if "=" in line)
        build = fields.get("build", "")
        if build in rows and build != "cpu":
            kept = choose({"BUILD_PROFILE": build}, rows)
            return dataclasses.replace(kept, asked=f"no BUILD_TYPE: keeps this venv's {build} build")
    return choose(env, rows)


def record(choice: Choice, path: Path) -> None:
    """Write the choice to `path` only if it differs, so its time changes exactly when the build does."""
    text = choice.record()
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def failure_message(choice: Choice, rows: Mapping[str, Row]) -> str:
    """What to say when pip could not install torch: the index, the build and how to fix it."""
    where = choice.index_url or "PyPI"
    return (
        f"error: pip could not install torch=={choice.torch} for the {choice.what} build ({choice.asked}) "
        f"from {choice.source}; pip's messages above give the cause.\n"
        f"Fix: check that this machine reaches {where} (network, firewall, proxy: pip honours HTTPS_PROXY); "
        f"or set TORCH_INDEX_URL to an index or mirror that has torch {choice.torch} for this platform and Python "
        "(TORCH_INDEX_URL= takes PyPI's default); or set BUILD_TYPE to the build that fits this machine "
        f"({known_builds(rows)})."
    )


def install(choice: Choice, rows: Mapping[str, Row], python: str, installed: Path) -> int:
    """Pip-install the chosen torch with the venv's `python`; `installed` records the build it holds.

    A venv that holds another build (its record differs) gets torch reinstalled; pip alone would keep it, since
    2.13.0+cpu satisfies torch==2.13.0 as well as 2.13.0+cu126 does. A venv without a record is taken as it is.
    """
    print(choice.why, flush=True)
    previous = installed.read_text() if installed.is_file() else None
    force = previous is not None and previous != choice.record()
    command = [python, "-m", "pip", "install", "--quiet"]
    if force:
        print("the venv holds another torch build (" + " ".join(previous.split()) + "): reinstalling torch")
        command.append("--force-reinstall")
    if not choice.with_deps:
        command.append("--no-deps")
    if choice.index_url:
        command += ["--index-url", choice.index_url]
    command.append(f"torch=={choice.torch}")
    print(shlex.join(command), flush=True)
    try:
        code = subprocess.call(command)
    except OSError as error:
        print(f"cannot run {python}: {error}", file=sys.stderr)
        code = 1
    if code != 0:
        print(failure_message(choice, rows), file=sys.stderr, flush=True)
        return 1
    installed.write_text(choice.record())
    return 0


def requirements(choice: Choice, path: Path = REQUIREMENTS) -> str:
    """requirements.txt with its torch line pinned to the chosen version (the same text where they agree)."""
    lines = path.read_text().splitlines(keepends=True)
    return "".join(f"torch=={choice.torch}\n" if TORCH_PIN.match(line.strip()) else line for line in lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="print the choice and why")
    record_parser = commands.add_parser("record", help="write the choice to PATH if it changed")
    record_parser.add_argument("path", type=Path)
    install_parser = commands.add_parser("install", help="pip-install the chosen torch into a venv")
    install_parser.add_argument("--python", required=True, help="the venv's python")
    install_parser.add_argument("--record", required=True, type=Path, help="where the venv records its build")
    commands.add_parser("requirements", help="print requirements.txt pinned to the chosen torch")
    args = parser.parse_args(argv)
    try:
        rows = read_table()
        choice = choose_for_venv(os.environ, rows, RECORDED)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "show":
        print(choice.record() + f"why={choice.why}")
    elif args.command == "record":
        record(choice, args.path)
    elif args.command == "install":
        return install(choice, rows, args.python, args.record)
    else:
        sys.stdout.write(requirements(choice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
