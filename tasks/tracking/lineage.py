"""Which MLflow runs produced the current outputs: the newest run of each stage, for the report."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ms2rgb.tasks.tracking import configure


def latest_stage_runs(root: Path, experiment: str) -> dict[str, str]:
    """stage -> id of its newest run in the project's `experiment` (stages never run are absent)."""
    configure(root, experiment)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.`ms2rgb.stage` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    newest: dict[str, str] = {}
    for run in runs:
        newest.setdefault(run.data.tags["ms2rgb.stage"], run.info.run_id)
    return newest
