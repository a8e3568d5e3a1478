"""Shared fixtures: a real project copy (git + DVC repo) on the tiny profile, under tmp dirs; a loopback
Prefect server for the modules that start real flow runs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"  # the venv's dvc, whether or not the venv is activated
SHARED_BUILD_PREFIX = "built-"  # tests/helpers_method_a.py: one build per stage, reused all session
PROJECT_FILES = ("dvc.yaml", ".dvcignore", "prefect.yaml", "data/scenes/README.md", "data/masks/README.md")


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs two pytest-xdist workers, a test file each at a time. Each worker's temporary
    Prefect servers get a PREFECT_HOME of their own: two servers on one SQLite file lock each other out.
    Two workers' torch threads share the cores: OpenMP threads that sleep instead of spinning while they
    wait (before torch starts them; subprocesses inherit it) made two 2-thread trainings at once 2.1x
    faster (3.5 s instead of 7.3 s for both; one alone: 1.9 s either way)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / f"xdist-{worker}"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first, each file's tests in their own order: the two workers start
    on the long files and the short ones fill in at the end, instead of one long file running alone last."""
    slow: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])
    if not torch.cuda.is_available():  # `gpu` tests run wherever torch sees CUDA, and only there
        no_gpu = pytest.mark.skip(reason="needs CUDA: torch sees no GPU here")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(no_gpu)


@pytest.fixture(autouse=True, scope="module")
def _no_tracking_uri_from_earlier_modules() -> Iterator[None]:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; module fixtures are set up before the
    function-scoped cleanup below, so without this one an earlier module's store would receive a
    later module's runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No tracking server, Prefect profile or telemetry from the developer's shell leaks in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # `dvc repro` runs stage commands (`ms2rgb stage ...`) through the shell: put the venv first.
    monkeypatch.setenv("PATH", f"{DVC.parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(autouse=True, scope="module")
def _free_disk_after_module(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A tiny project that ran the pipeline weighs 0.2-0.7 GB and a full run makes dozens: the folders a
    module made go once all its tests passed, so the suite fits a CI disk (a failed module's stay for a look).
    The session's shared builds (``built-*``, tests/helpers_method_a.py) serve later modules and stay."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for made in set(base.iterdir()) - before:
            if not made.name.startswith(SHARED_BUILD_PREFIX) and not made.is_symlink():
                shutil.rmtree(made, ignore_errors=True)


def run_checked(args: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """subprocess.run that, when the command fails, fails the test with the command's own stderr (tail),
    so a CI log says why `dvc repro` stopped instead of only its exit status."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode} in {cwd}:\n{done.stderr[-4000:]}")
    return done


def make_project(dest: Path, profile: str = "tiny") -> Path:
    """Copy what a pipeline run needs into `dest` and make it a git + DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dest / rel)
    # DVC hashes the stage code named in dvc.yaml, so the copy carries the sources too.
    for package in ("tasks", "models", "flows"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = (REPO / "params.yaml").read_text().replace("profile: default", f"profile: {profile}", 1)
    (dest / "params.yaml").write_text(params)
    dvc = str(DVC)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=dest, check=True)
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")  # local remote, cache type, no analytics
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def reproduced_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project on which `dvc repro` ran the whole pipeline: every stage fresh, every model a
    champion. The first test of the session (of any xdist worker) to ask builds it, under a file lock
    in the folder the workers share, and the others wait for it: one build of about 2.5 minutes instead
    of one per module that needs it. Never change it: take a copy with :func:`copy_project`."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / f"{SHARED_BUILD_PREFIX}reproduced-tiny"
    with FileLock(str(shared / "reproduced-tiny.lock")):
        if not (folder / "complete").is_file():  # a build that failed halfway is started again
            shutil.rmtree(folder, ignore_errors=True)
            # Built before any test's _hermetic_env applies: the same environment, by hand.
            env = {**os.environ, "PATH": f"{DVC.parent}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
            env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false"}
            env.pop("MLFLOW_TRACKING_URI", None)
            run_checked([str(DVC), "repro"], cwd=make_project(folder / "project"), env=env, timeout=1200)
            (folder / "complete").touch()
    return folder / "project"


def copy_project(src: Path, dest: Path) -> Path:
    """A project folder copied whole (git, DVC cache, MLflow store), links kept as links."""
    return shutil.copytree(src, dest, symlinks=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start --host 127.0.0.1 --port <free>` with a temporary PREFECT_HOME, stopped after."""
    from ms2rgb.flows import serve as serving

    home = tmp_path_factory.mktemp("prefect-server")
    with pytest.MonkeyPatch.context() as patch:  # short waits, so a queued retrain is retried quickly
        patch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "5")
        patch.delenv("PREFECT_API_URL", raising=False)
        url = serving.start_server(home, free_port(), ui=False, timeout=240)
    try:
        yield url
    finally:
        stopped = serving.stop(home)
        assert stopped["server"] is not None
