"""The tracker logs to its own run, whoever calls it and whichever run is active."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ms2rgb.tasks import tracking


def test_a_stage_tracker_used_inside_its_child_still_logs_to_its_own_run(tmp_path: Path) -> None:
    with tracking.stage_run(tmp_path, "ms2rgb", "teacher") as stage, stage.child("teacher/variant") as child:
        stage.log_metrics({"stage_metric": 1.0})
        stage.log_params({"stage": {"width": 8}})
        stage.log_json({"a": 1}, "stage.json")
        child.log_metrics({"child_metric": 2.0})
    client = MlflowClient()
    parent_run, child_run = client.get_run(stage.run_id), client.get_run(child.run_id)
    assert parent_run.data.metrics == {"stage_metric": 1.0}
    assert parent_run.data.params == {"stage.width": "8"}
    assert child_run.data.metrics == {"child_metric": 2.0} and child_run.data.params == {}
    assert child_run.data.tags["mlflow.parentRunId"] == stage.run_id
    assert [f.path for f in client.list_artifacts(stage.run_id)] == ["stage.json"]
    assert client.list_artifacts(child.run_id) == []
    assert parent_run.info.status == child_run.info.status == "FINISHED"
