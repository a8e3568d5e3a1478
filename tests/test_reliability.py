"""Nothing lost, nothing hidden: the project lock, fail-fast services, runs left by killed processes,
one clean error line. Real processes wherever a kill or a race is involved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ms2rgb.tasks import tracking

MS2RGB = str(Path(sys.executable).parent / "ms2rgb")


def _ms2rgb(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MS2RGB, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _hold_lock(root: Path) -> subprocess.Popen[str]:
    """Another process that takes the project lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ms2rgb.flows.lock import project_lock
        with project_lock(Path({str(root)!r}), "ms2rgb run"):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_second_command_exits_naming_the_holder_and_a_killed_holder_frees_the_lock(project: Path) -> None:
    holder = _hold_lock(project)
    try:
        busy = _ms2rgb(project, "data", "synth", "--out", str(project / "s"))
        assert busy.returncode == 2
        first = busy.stderr.strip().splitlines()[0]
        assert "project is busy" in first and f"pid {holder.pid}" in first and "ms2rgb run" in first
        assert not (project / "s").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    freed = _ms2rgb(project, "data", "synth", "--out", str(project / "s"))  # no stale lock after kill -9
    assert freed.returncode == 0, freed.stderr
    assert (project / "s" / "manifest.parquet").exists()


@pytest.mark.slow
def test_wait_lets_a_second_command_queue_behind_the_first(project: Path) -> None:
    holder = _hold_lock(project)
    try:
        waiter = subprocess.Popen(
            [MS2RGB, "--root", str(project), "--wait", "60", "data", "synth", "--out", str(project / "s")],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert waiter.poll() is None  # still waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert waiter.wait(timeout=120) == 0


@pytest.mark.slow
def test_unreachable_tracking_server_fails_within_the_bound_naming_the_uri(project: Path) -> None:
    start = time.monotonic()
    result = _ms2rgb(
        project, "stage", "prepare", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MS2RGB_TRACKING_TIMEOUT": "3"}
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and elapsed < 30
    message = result.stderr.strip().splitlines()[-1]
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:9" in message and "mlflow server" in message
    assert "Traceback" not in result.stderr


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(project: Path) -> None:
    text = (project / "params.yaml").read_text().replace("seed: 0\n", "seed: 0: oops\n", 1)
    (project / "params.yaml").write_text(text)
    result = _ms2rgb(project, "stage", "prepare")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "params.yaml:" in result.stderr and "YAML syntax error" in result.stderr


def test_runs_left_running_by_a_killed_process_are_marked_killed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracking.configure(tmp_path, "ms2rgb")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ms2rgb")
    orphan = client.create_run(
        experiment.experiment_id, tags={tracking.PID_TAG: str(dead.pid), tracking.HOST_TAG: os.uname().nodename}
    )
    alive = client.create_run(
        experiment.experiment_id, tags={tracking.PID_TAG: str(os.getpid()), tracking.HOST_TAG: os.uname().nodename}
    )
    tracking.configure(tmp_path, "ms2rgb")  # the next start reaps
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_a_user_error_under_run_is_one_clean_line_and_exit_2(project: Path) -> None:
    """An error raised inside a stage under Prefect: no traceback on the console unless -v."""
    text = (project / "params.yaml").read_text()
    text = text.replace("source: synth ", "source: eurosat ", 1).replace(
        "eurosat_ms_dir: null", f"eurosat_ms_dir: {project / 'no-such-folder'}", 1
    )
    (project / "params.yaml").write_text(text)
    quiet = _ms2rgb(project, "run", timeout=300)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stdout + quiet.stderr
    errors = [line for line in quiet.stderr.splitlines() if line.startswith("ms2rgb: error: ")]
    assert len(errors) == 1 and "no-such-folder" in errors[0] and "EuroSAT MS folder not found" in errors[0]
    loud = _ms2rgb(project, "-v", "run", timeout=300)
    assert loud.returncode == 2 and "Traceback" in loud.stdout + loud.stderr


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("    model: ms2rgb-tiny-vit", "    model: no-such-model", "detector.clip.model='no-such-model'"),
        (
            "student: {steps: 6, batch_size: 16, heads: 2,",
            "student: {steps: 6, batch_size: 16, heads: 3,",
            "student.heads=3",
        ),
    ],
)
def test_a_bad_value_of_any_stage_stops_run_before_the_first_stage(project: Path, old: str, new: str, key: str) -> None:
    stored = project / "artifacts" / "detector" / "detector.pt"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"the stored detector")
    text = (project / "params.yaml").read_text()
    assert old in text
    (project / "params.yaml").write_text(text.replace(old, new, 1))
    result = _ms2rgb(project, "run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and key in result.stderr
    assert stored.read_bytes() == b"the stored detector"
    assert not (project / "reports").exists() and not (project / "mlflow.db").exists()  # no stage ran


def test_detect_with_a_registry_uri_in_a_fresh_project_creates_no_store(project: Path) -> None:
    image = project / "image.tif"
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(
        image,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(400000, 5000000, 10, 10),
    ) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    result = _ms2rgb(project, "detect", str(image), "--classes", "water", "--model", "models:/ms2rgb-detector/1")
    assert result.returncode == 2 and "no MLflow store" in result.stderr
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
