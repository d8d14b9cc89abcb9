"""Build types: which torch `make install` takes for each hardware build, and what a failed install leaves behind.

Nothing here downloads. The choices are read through tools/torch_build.py and its table, as the Makefile reads
them; the Makefile itself runs in a temporary copy of the project with a stand-in python whose pip only logs its
arguments (or fails on purpose), so the tests see which commands an install runs and what a failure leaves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "torch_build.py"
TABLE = ROOT / "tools" / "torch-builds.txt"
# What LocalAI's build may set, and what an outer `make test` passes down: none of it may leak into these runs.
BUILD_VARIABLES = ("BUILD_TYPE", "CUDA_MAJOR_VERSION", "BUILD_PROFILE", "TORCH_INDEX_URL")
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "GNUMAKEFLAGS")
KNOWN = ("cpu", "cublas", "cublas12", "cublas13", "hipblas", "intel", "l4t", "l4t12", "l4t13", "mps")
PYTORCH = "https://download.pytorch.org/whl/"
JETSON_6 = "https://pypi.jetson-ai-lab.io/jp6/cu126"
JETSON_6_TORCH = "2.11.0"


def requirements_pin() -> str:
    """The torch version requirements.txt pins."""
    match = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert match, "requirements.txt pins no torch"
    return match.group(1)


PIN = requirements_pin()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without build or make variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in BUILD_VARIABLES + MAKE_VARIABLES}
    env.update(extra or {})
    return env


def run_script(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run tools/torch_build.py as the Makefile does, with only `env`'s build variables set."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=clean_env(env), capture_output=True, text=True, timeout=60
    )


def show(env: Mapping[str, str]) -> dict[str, str]:
    """The choice `env` makes, as `key=value` pairs (build, index_url, torch, deps, why)."""
    done = run_script("show", env=env)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


@dataclass(frozen=True)
class Expected:
    """What one build type must install, and the words the install says it with."""

    env: dict[str, str]
    build: str
    index_url: str
    torch: str
    deps: str
    why: str


def pytorch(name: str) -> str:
    """The URL of one of PyTorch's indexes."""
    return PYTORCH + name


CASES = [
    Expected(
        {}, "cpu", pytorch("cpu"), PIN, "no-deps", f"torch build: cpu (no BUILD_TYPE: the default) from {PYTORCH}cpu"
    ),
    Expected({"BUILD_TYPE": ""}, "cpu", pytorch("cpu"), PIN, "no-deps", "(no BUILD_TYPE: the default)"),
    Expected({"BUILD_TYPE": "cpu"}, "cpu", pytorch("cpu"), PIN, "no-deps", "torch build: cpu (BUILD_TYPE=cpu)"),
    Expected(
        {"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "12"},
        "cublas12",
        pytorch("cu126"),
        PIN,
        "with-deps",
        f"torch build: cuda 12 (BUILD_TYPE=cublas, CUDA_MAJOR_VERSION=12) from {PYTORCH}cu126, torch {PIN}",
    ),
    Expected(
        {"BUILD_TYPE": "cublas"},
        "cublas12",
        pytorch("cu126"),
        PIN,
        "with-deps",
        "torch build: cuda 12 (BUILD_TYPE=cublas, no CUDA_MAJOR_VERSION: 12)",
    ),
    Expected(
        {"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "13"},
        "cublas13",
        pytorch("cu130"),
        PIN,
        "with-deps",
        f"torch build: cuda 13 (BUILD_TYPE=cublas, CUDA_MAJOR_VERSION=13) from {PYTORCH}cu130",
    ),
    Expected(
        {"BUILD_TYPE": "cublas12"}, "cublas12", pytorch("cu126"), PIN, "with-deps", "cuda 12 (BUILD_TYPE=cublas12)"
    ),
    Expected(
        {"BUILD_TYPE": "cublas13"}, "cublas13", pytorch("cu130"), PIN, "with-deps", "cuda 13 (BUILD_TYPE=cublas13)"
    ),
    Expected(
        {"BUILD_TYPE": "hipblas"}, "hipblas", pytorch("rocm7.2"), PIN, "with-deps", "rocm 7.2 (BUILD_TYPE=hipblas)"
    ),
    Expected({"BUILD_TYPE": "intel"}, "intel", pytorch("xpu"), PIN, "with-deps", "intel xpu (BUILD_TYPE=intel)"),
    Expected(
        {"BUILD_TYPE": "l4t12"},
        "l4t12",
        JETSON_6,
        JETSON_6_TORCH,
        "with-deps",
        f"torch build: jetson jetpack 6, cuda 12 (BUILD_TYPE=l4t12) from {JETSON_6}, torch {JETSON_6_TORCH}",
    ),
    Expected(
        {"BUILD_TYPE": "l4t13"}, "l4t13", pytorch("cu130"), PIN, "with-deps", "jetpack 7, cuda 13 (BUILD_TYPE=l4t13)"
    ),
    Expected(
        {"BUILD_TYPE": "l4t", "CUDA_MAJOR_VERSION": "12"},
        "l4t12",
        JETSON_6,
        JETSON_6_TORCH,
        "with-deps",
        "(BUILD_TYPE=l4t, CUDA_MAJOR_VERSION=12)",
    ),
    Expected(
        {"BUILD_TYPE": "l4t", "CUDA_MAJOR_VERSION": "13"},
        "l4t13",
        pytorch("cu130"),
        PIN,
        "with-deps",
        "(BUILD_TYPE=l4t, CUDA_MAJOR_VERSION=13)",
    ),
    Expected(
        {"BUILD_TYPE": "mps"},
        "mps",
        "",
        PIN,
        "no-deps",
        f"torch build: macos metal (BUILD_TYPE=mps) from PyPI's default index, torch {PIN}",
    ),
    Expected(
        {"BUILD_PROFILE": "cublas13", "BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "12"},
        "cublas13",
        pytorch("cu130"),
        PIN,
        "with-deps",
        "(BUILD_PROFILE=cublas13, which wins over BUILD_TYPE=cublas)",
    ),
    Expected(
        {"BUILD_PROFILE": "cublas", "CUDA_MAJOR_VERSION": "13"},
        "cublas13",
        pytorch("cu130"),
        PIN,
        "with-deps",
        "(BUILD_PROFILE=cublas, CUDA_MAJOR_VERSION=13)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(f"{k}={v}" for k, v in case.env.items()) or "none")
def test_each_build_type_picks_its_index_torch_and_says_why(case: Expected) -> None:
    """Every build type LocalAI may pass picks the table's index and torch, and the line says which and why."""
    choice = show(case.env)
    assert choice["build"] == case.build
    assert choice["index_url"] == case.index_url
    assert choice["torch"] == case.torch
    assert choice["deps"] == case.deps
    assert case.why in choice["why"]


def test_every_row_of_the_table_is_reachable_and_pytorch_rows_keep_the_pin() -> None:
    """Each row is a build type one can ask for; the rows on PyPI or PyTorch's indexes take requirements.txt's pin.

    Only an index that does not carry that pin (Jetson AI Lab's) may name its own version.
    """
    rows = [line.split() for line in TABLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert {row[0] for row in rows} == {name for name in KNOWN if name not in ("cublas", "l4t")}
    for build, torch, deps, index, *_ in rows:
        assert show({"BUILD_TYPE": build})["build"] == build
        assert deps in ("no-deps", "with-deps")
        if index.startswith(PYTORCH) or index == "pypi":
            assert torch == "requirements.txt", build
        else:
            assert re.fullmatch(r"\d+\.\d+\.\d+", torch), build


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BUILD_TYPE": "bogus"}, "'bogus' (BUILD_TYPE=bogus)"),
        ({"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "11"}, "'cublas11' (BUILD_TYPE=cublas, CUDA_MAJOR_VERSION=11)"),
        ({"BUILD_PROFILE": "vulkan"}, "'vulkan' (BUILD_PROFILE=vulkan)"),
    ],
)
def test_an_unknown_build_type_fails_with_the_known_ones(env: dict[str, str], named: str, tmp_path: Path) -> None:
    """An unknown build type fails, naming what was asked, every known build type, and the fix."""
    record = tmp_path / "record"
    for command in (["show"], ["record", str(record)], ["requirements"]):
        done = run_script(*command, env=env)
        assert done.returncode == 2
        assert f"unknown build type {named}" in done.stderr
        listed = done.stderr.split("Known build types:", 1)[1]
        for name in KNOWN:
            assert re.search(rf"\b{name}\b", listed), name
        assert "Fix: set BUILD_TYPE" in done.stderr
        assert "TORCH_INDEX_URL" in done.stderr
    assert not record.exists()


def test_torch_index_url_overrides_the_index_only() -> None:
    """TORCH_INDEX_URL replaces the table's index (empty: PyPI's default); the torch version and deps stay."""
    mirror = "https://mirror.example/whl/cu126"
    choice = show({"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "12", "TORCH_INDEX_URL": mirror})
    assert (choice["build"], choice["index_url"], choice["torch"], choice["deps"]) == (
        "cublas12",
        mirror,
        PIN,
        "with-deps",
    )
    assert f"from {mirror} (TORCH_INDEX_URL; the table says {PYTORCH}cu126)" in choice["why"]

    pypi = show({"TORCH_INDEX_URL": ""})
    assert (pypi["build"], pypi["index_url"], pypi["deps"]) == ("cpu", "", "no-deps")
    assert "from PyPI's default index (TORCH_INDEX_URL; the table says" in pypi["why"]

    jetson = show({"BUILD_TYPE": "l4t12", "TORCH_INDEX_URL": mirror})
    assert (jetson["index_url"], jetson["torch"]) == (mirror, JETSON_6_TORCH)


def test_torch_index_url_lets_an_unknown_build_type_through() -> None:
    """With an index of one's own, a build type the table lacks gets the cpu row's torch from that index."""
    choice = show({"BUILD_TYPE": "vulkan", "TORCH_INDEX_URL": "https://mirror.example/simple"})
    assert (choice["build"], choice["index_url"], choice["torch"], choice["deps"]) == (
        "vulkan",
        "https://mirror.example/simple",
        PIN,
        "no-deps",
    )
    assert "not in the table" in choice["why"]


def test_the_rest_of_the_requirements_follow_the_builds_torch() -> None:
    """requirements.txt goes to pip as it is, but for a build with its own torch version, which replaces the pin."""
    requirements = (ROOT / "requirements.txt").read_text()
    assert run_script("requirements").stdout == requirements
    assert run_script("requirements", env={"BUILD_TYPE": "cublas"}).stdout == requirements
    jetson = run_script("requirements", env={"BUILD_TYPE": "l4t12"}).stdout
    assert jetson == requirements.replace(f"torch=={PIN}\n", f"torch=={JETSON_6_TORCH}\n")
    assert jetson != requirements


# --- the Makefile, run in a copy of the project with a python whose pip only logs -------------------------------

SYSTEM_PYTHON = """#!/bin/sh
# Stands in for the system python: `-m venv DIR` makes a venv with the logging python; the rest runs the real one.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  echo "venv $3" >> "$(dirname "$0")/pip.log"
  [ -n "$FAIL_VENV" ] && { echo "Error: simulated venv failure" >&2; exit 1; }
  mkdir -p "$3/bin" && cp "$(dirname "$0")/venv-python" "$3/bin/python" && exit 0
fi
exec PYTHON "$@"
"""

VENV_PYTHON = """#!/bin/sh
# The venv's python: logs what pip is asked to do, fails where FAIL_ON matches, makes empty stubs for protoc.
echo "$*" >> "$(dirname "$0")/../../pip.log"
if [ -n "$FAIL_ON" ]; then
  case "$*" in *"$FAIL_ON"*) echo "ERROR: simulated failure of: $*" >&2; exit 1 ;; esac
fi
case "$*" in *grpc_tools.protoc*) touch backend_pb2.py backend_pb2_grpc.py ;; esac
exit 0
"""


@dataclass
class Project:
    """A copy of what `make install` reads, with the stand-in pythons beside it."""

    root: Path

    @property
    def venv(self) -> Path:
        """The copy's venv."""
        return self.root / ".venv"

    def make(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`make install ARGS` in the copy, with the stand-in python and only `env`'s build variables."""
        return subprocess.run(
            ["make", "install", "PYTHON=./system-python", *args],
            cwd=self.root,
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def log(self) -> list[str]:
        """What the stand-in pythons were asked to do, in order."""
        path = self.root / "pip.log"
        return path.read_text().splitlines() if path.exists() else []

    def torch_installs(self) -> list[str]:
        """The pip commands that installed torch."""
        return [line for line in self.log() if "pip install" in line and "torch==" in line]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """The Makefile, requirements, proto and tools/ copied to a temporary folder, with stand-in pythons."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.txt", "requirements-nodeps.txt", "backend.proto"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in (
        ("system-python", SYSTEM_PYTHON.replace("exec PYTHON", f"exec {sys.executable}")),
        ("venv-python", VENV_PYTHON),
    ):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return Project(tmp_path)


def output(done: subprocess.CompletedProcess[str]) -> str:
    """A make run's stdout and stderr together."""
    return done.stdout + done.stderr


def test_install_takes_torch_from_the_builds_index_once(project: Project) -> None:
    """The default install takes torch alone from the CPU index, says why, and a second make redoes nothing."""
    done = project.make()
    assert done.returncode == 0, output(done)
    assert f"torch build: cpu (no BUILD_TYPE: the default) from {PYTORCH}cpu, torch {PIN}" in done.stdout
    assert project.torch_installs() == [
        f"-m pip install --quiet --no-deps --index-url {PYTORCH}cpu torch=={PIN}",
    ]
    assert "-m pip install --quiet -r .venv/requirements-build.txt" in project.log()
    assert (project.venv / ".installed").is_file()
    assert (project.venv / "requirements-build.txt").read_text() == (project.root / "requirements.txt").read_text()

    before = project.log()
    again = project.make()
    assert again.returncode == 0, output(again)
    assert project.log() == before


def test_switching_the_build_reinstalls_torch_from_the_new_index(project: Project) -> None:
    """A new BUILD_TYPE makes the install run again and replace torch; the same build asked otherwise does not."""
    assert project.make().returncode == 0
    done = project.make(env={"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "13"})
    assert done.returncode == 0, output(done)
    assert "torch build: cuda 13 (BUILD_TYPE=cublas, CUDA_MAJOR_VERSION=13)" in done.stdout
    assert project.torch_installs()[-1] == (
        f"-m pip install --quiet --force-reinstall --index-url {PYTORCH}cu130 torch=={PIN}"
    )
    assert "build=cublas13\n" in (project.venv / ".torch-build").read_text()

    before = project.log()
    assert project.make("BUILD_TYPE=cublas13").returncode == 0  # on make's command line, the same build
    assert project.log() == before


def test_torch_index_url_reaches_pip(project: Project) -> None:
    """TORCH_INDEX_URL (environment or make's command line) is the index pip is given; empty means PyPI's."""
    assert project.make("TORCH_INDEX_URL=https://mirror.example/whl/cpu").returncode == 0
    assert project.torch_installs()[-1].endswith("--index-url https://mirror.example/whl/cpu torch==" + PIN)
    assert project.make(env={"TORCH_INDEX_URL": ""}).returncode == 0
    assert project.torch_installs()[-1].endswith(f"--force-reinstall --no-deps torch=={PIN}")


def test_a_failed_torch_install_names_the_index_build_and_fix_and_leaves_no_venv(project: Project) -> None:
    """pip failing on torch: the message names the index, the build and the fixes, and the venv is gone."""
    done = project.make(env={"BUILD_TYPE": "hipblas", "FAIL_ON": "torch=="})
    assert done.returncode != 0
    text = output(done)
    assert f"error: pip could not install torch=={PIN} for the rocm 7.2 build (BUILD_TYPE=hipblas)" in text
    assert f"from {PYTORCH}rocm7.2" in text
    assert "Fix: check that this machine reaches" in text
    assert "set TORCH_INDEX_URL" in text
    assert "set BUILD_TYPE" in text
    assert "make: install failed; removed .venv" in text
    assert not project.venv.exists()

    retry = project.make(env={"BUILD_TYPE": "hipblas"})
    assert retry.returncode == 0, output(retry)
    assert project.log().count("venv .venv") == 2  # started again from a new venv


@pytest.mark.parametrize(
    "failing", ["venv", "--upgrade pip", "torch==", "requirements-build.txt", "requirements-nodeps.txt"]
)
def test_any_failed_step_leaves_no_venv_that_make_takes_as_done(project: Project, failing: str) -> None:
    """Whichever step fails, on a new venv or on one that was installed, no venv is left for make to trust."""
    fail = {"FAIL_VENV": "1"} if failing == "venv" else {"FAIL_ON": failing}
    done = project.make(env=fail)
    assert done.returncode != 0
    assert not project.venv.exists()

    assert project.make().returncode == 0
    newer = (project.venv / ".installed").stat().st_mtime + 2  # the next install must run again, and fails there
    os.utime(project.root / "requirements.txt", (newer, newer))
    if failing == "venv":
        (project.venv / "bin" / "python").unlink()  # a venv without its python is made again, and that fails
    done = project.make(env=fail)
    assert done.returncode != 0
    assert not project.venv.exists()
    assert project.make().returncode == 0
    assert (project.venv / ".installed").is_file()


def test_an_unknown_build_type_fails_the_install_and_keeps_a_working_venv(project: Project) -> None:
    """A typo in BUILD_TYPE fails before any step runs: the list of build types, and the installed venv intact."""
    assert project.make().returncode == 0
    before = project.log()
    done = project.make("BUILD_TYPE=cublass")
    assert done.returncode != 0
    assert "unknown build type 'cublass' (BUILD_TYPE=cublass)" in done.stderr
    assert "Known build types: cpu (or empty), cublas (with CUDA_MAJOR_VERSION 12 or 13" in done.stderr
    assert project.log() == before
    assert (project.venv / ".installed").is_file()
    assert project.make().returncode == 0
    assert project.log() == before


def test_a_plain_make_keeps_the_venvs_gpu_build(tmp_path: Path) -> None:
    """After `BUILD_TYPE=cublas make`, `make run` (no hardware variables) keeps CUDA torch instead of going back to
    the CPU build; naming a build type still switches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_build", ROOT / "tools" / "torch_build.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    sys.modules["torch_build"] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    rows = tool.read_table()
    recorded = tmp_path / ".torch-build"
    recorded.write_text(tool.choose({"BUILD_TYPE": "cublas", "CUDA_MAJOR_VERSION": "13"}, rows).record())
    kept = tool.choose_for_venv({}, rows, recorded)
    assert kept.build == "cublas13" and "keeps this venv's cublas13 build" in kept.why
    assert tool.choose_for_venv({"BUILD_TYPE": "cpu"}, rows, recorded).build == "cpu"
    assert tool.choose_for_venv({}, rows, tmp_path / "missing").build == "cpu"
