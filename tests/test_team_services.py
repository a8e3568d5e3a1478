"""A team's deployment on shared services, started for real on loopback (tests/helpers_services.py):
MLflow on PostgreSQL + S3, Prefect on the same PostgreSQL, the DVC remote and the landing location on
the same S3 endpoint. The tiny pipeline, a scene landed in the bucket and its retrain run against them
with environment variables and DVC's own remote config only, and nothing lands in a local store."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import DVC, free_port, make_project, run_checked
from helpers_prefect import venv_env, wait_for
from helpers_services import BIN, S3_ENV, mlflow_server, postgres, s3_endpoint, s3_keys, upload
from test_operations import RETRAIN_SCRIPT, write_scene

pytestmark = pytest.mark.slow

BUCKET = "team-ms2rgb"
LOCAL_STORES = ("mlflow.db", "mlruns", "mlartifacts", ".dvc-storage")  # the defaults of a one-person project


@dataclass(frozen=True)
class Services:
    postgres: str  # user@host:port
    s3: str  # endpoint URL
    tracking_uri: str
    prefect_api: str

    def env(self) -> dict[str, str]:
        """What a team member exports (README, "Team services"): no file of the project names a server."""
        env = venv_env(**S3_ENV, AWS_ENDPOINT_URL=self.s3, PREFECT_API_URL=self.prefect_api)
        return env | {"MLFLOW_TRACKING_URI": self.tracking_uri}  # venv_env drops a tracking URI


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    from ms2rgb.flows import serve as serving

    folder = tmp_path_factory.mktemp("services")
    with (
        postgres(("mlflow", "prefect")) as pg,
        s3_endpoint(folder, (BUCKET,)) as s3,
        mlflow_server(folder, f"postgresql://{pg}/mlflow", f"s3://{BUCKET}/mlflow", s3) as tracking_uri,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"postgresql+asyncpg://{pg}/prefect")
        patch.delenv("PREFECT_API_URL", raising=False)
        home = folder / "prefect"
        api = serving.start_server(home, free_port(), ui=False, timeout=240)  # `make serve`'s own server
        try:
            yield Services(pg, s3, tracking_uri, api)
        finally:
            serving.stop(home)


def _team_project(root: Path) -> None:
    """The landing location in the bucket (params) and the DVC remote in the bucket (`dvc remote add`)."""
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["landing"] |= {"location": f"s3://{BUCKET}/landing", "stable_polls": 1}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_checked([str(DVC), "remote", "add", "--default", "team", f"s3://{BUCKET}/dvc"], cwd=root)


def _rows(postgres_at: str, database: str, query: str) -> list[tuple[object, ...]]:
    import psycopg2

    user, address = postgres_at.split("@")
    host, port = address.split(":")
    with psycopg2.connect(host=host, port=int(port), user=user, dbname=database) as connection:
        cursor = connection.cursor()
        cursor.execute(query)
        return list(cursor.fetchall())


def test_pipeline_landing_and_retrain_use_only_the_team_services(services: Services, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    root = make_project(tmp_path / "project")
    _team_project(root)
    env, ms2rgb = services.env(), str(BIN / "ms2rgb")

    run_checked([ms2rgb, "run"], cwd=root, env=env, timeout=1500)
    scene = write_scene(tmp_path / "drop" / "late.tif", seed=31)
    upload(services.s3, scene, f"s3://{BUCKET}/landing/late.tif")
    watched = run_checked([ms2rgb, "watch", "--polls", "2", "--every", "1"], cwd=root, env=env, timeout=600)
    assert "ingested     late.tif" in watched.stdout and "announced ['late']" in watched.stdout, watched.stdout
    retrained = run_checked([sys.executable, "-c", RETRAIN_SCRIPT, str(root)], cwd=root, env=env, timeout=1200)
    summary = json.loads(retrained.stdout.split("RESULT:")[1])
    assert summary["scenes"] == ["late"] and {"prepare", "student", "evaluate"} <= set(summary["ran"])
    assert summary["pushed"].startswith("dvc push to 'team': ") and summary["tagged_runs"] > 0

    # Nothing in a local store: no MLflow database or artifact folder, no push to a local DVC remote.
    for folder in (root, tmp_path):
        assert not [name for name in LOCAL_STORES if (folder / name).exists()], sorted(p.name for p in folder.iterdir())

    # The bucket holds the data version the retrain recorded, the models' artifacts and the landed scene.
    keys = set(s3_keys(services.s3, BUCKET))
    version = summary["data_version"]  # data/prepared's directory hash in dvc.lock
    assert f"dvc/files/md5/{version[:2]}/{version[2:]}" in keys
    assert "landing/late.tif" in keys  # a good scene stays where it landed
    artifacts = [k for k in keys if k.startswith("mlflow/")]
    assert any(k.endswith(".pt") for k in artifacts), sorted(artifacts)[:20]

    # MLflow on PostgreSQL: every model has a champion; the retrain's runs carry its scene.
    client = MlflowClient(services.tracking_uri)
    champions = {m.name: m.aliases.get("champion") for m in client.search_registered_models()}
    assert set(champions) >= {"ms2rgb-teacher", "ms2rgb-student", "ms2rgb-detector"} and all(champions.values())
    experiment = client.get_experiment_by_name("ms2rgb")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    tagged = client.search_runs([experiment.experiment_id], "tags.`ms2rgb.scenes` = 'late'")
    assert len(tagged) == summary["tagged_runs"]
    ((stored_runs,),) = _rows(services.postgres, "mlflow", "SELECT count(*) FROM runs")
    assert stored_runs == len(client.search_runs([experiment.experiment_id], max_results=5000))

    # Prefect on the same PostgreSQL: the three flows' runs, completed, and the landed event.
    flows = _rows(
        services.postgres,
        "prefect",
        "SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id",
    )
    completed = {name for name, state in flows if state == "COMPLETED"}
    assert {"pipeline", "watch", "retrain"} <= completed, flows
    landed = "SELECT resource FROM events WHERE event = 'ms2rgb.scene.landed'"
    events = wait_for(lambda: _rows(services.postgres, "prefect", landed), 60, "the stored event")  # written in batches
    assert len(events) == 1 and str(root) in str(events[0][0])
