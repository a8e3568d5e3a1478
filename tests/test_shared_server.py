"""Two projects on one tracking server: `tracking.experiment` and `tracking.model_prefix` keep their runs,
registered models and `champion` aliases apart, and a retrain tags only the runs of its own flow run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers_params import repo_params
from mlflow.tracking import MlflowClient

from ms2rgb.flows.deployments import all_names
from ms2rgb.flows.serve import automation_name
from ms2rgb.tasks import tracking
from ms2rgb.tasks.config import MODEL_KINDS, load_params, model_name
from ms2rgb.tasks.errors import Ms2rgbError, ParamsError

# ---------------------------------------------------------------- the names and their checks


def test_the_defaults_give_the_names_of_before() -> None:
    names = repo_params().tracking
    assert names.experiment == "ms2rgb"
    assert [model_name(names.model_prefix, kind) for kind in MODEL_KINDS] == [
        "ms2rgb-teacher",
        "ms2rgb-matcher",
        "ms2rgb-student",
        "ms2rgb-detector",
        "ms2rgb-clip-backbone",
    ]
    assert automation_name(names.model_prefix) == "ms2rgb: retrain on ms2rgb.scene.landed"
    assert all_names("team-b") == ("pipeline/team-b-default", "watch/team-b-landing", "retrain/team-b-on-new-scenes")
    with pytest.raises(ValueError, match=r"unknown model kind 'pairs'; valid kinds are \['teacher'"):
        model_name("ms2rgb", "pairs")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key, value, fix",
    [
        ("model_prefix", "", "use 1 to 100 letters, digits"),
        ("model_prefix", "team/a", "MLflow refuses '/' and ':'"),
        ("model_prefix", "team a", "a space breaks models:/ URIs"),
        ("model_prefix", "team@a", "'@'"),
        ("model_prefix", "-a", "starting with a letter or digit"),
        ("experiment", "", "give a non-empty name"),
        ("experiment", " ms2rgb", "without leading or trailing spaces"),
        ("experiment", "ms2rgb\nb", "control character"),
    ],
)
def test_bad_names_stop_with_one_line_naming_key_value_and_fix(key: str, value: str, fix: str) -> None:
    with pytest.raises(ParamsError) as caught:
        repo_params(**{f"tracking__{key}": value})
    message = str(caught.value)
    assert message.startswith(f"params.yaml: tracking.{key}={value!r} is invalid: ") and fix in message
    assert "\n" not in message.replace(repr(value), "")  # one line (a newline in the value is shown escaped)


def test_the_deployments_and_their_trigger_carry_the_project_prefix() -> None:
    from ms2rgb.flows.serve import build_deployments, retrain_trigger

    params = repo_params(tracking__model_prefix="team-b")
    names = [f"{d.flow_name}/{d.name}" for d in build_deployments(Path("/project-b"), params)]
    assert names == list(all_names("team-b"))
    assert retrain_trigger(Path("/project-b"), "team-b").name == "team-b: retrain on ms2rgb.scene.landed"


# ---------------------------------------------------------------- two projects, one store


def _name_project(root: Path, experiment: str, prefix: str) -> None:
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["tracking"] = {"experiment": experiment, "model_prefix": prefix}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_two_projects_on_one_store_keep_their_models_and_champions_apart(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers_method_a import staged_project

    from ms2rgb.flows.stages import run_stage
    from ms2rgb.tasks.evaluate import promote_by_hand

    projects = {"a": ("forest-maps", "team-a"), "b": ("roof-maps", "team-b")}
    roots = {key: staged_project(tmp_path_factory, "validate", tmp_path / key) for key in projects}
    monkeypatch.chdir(tmp_path)  # a store named by URI keeps its artifacts under the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")  # the one server
    for key, (experiment, prefix) in projects.items():
        _name_project(roots[key], experiment, prefix)
        assert run_stage("teacher", roots[key])["model_version"] == 1  # each model numbers its own versions
    for key, root in roots.items():
        decision = promote_by_hand(root, load_params(root), f"{projects[key][1]}-teacher", 1, force=True)
        assert (decision.decision, decision.champion) == ("forced", 1)

    client = MlflowClient()
    models = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    assert models == {
        "team-a-teacher": {"champion": 1, "challenger": 1},
        "team-b-teacher": {"champion": 1, "challenger": 1},
    }
    for experiment, prefix in projects.values():
        found = client.get_experiment_by_name(experiment)
        assert found is not None
        runs = client.search_runs([found.experiment_id])
        assert [r.data.tags["ms2rgb.stage"] for r in runs] == ["teacher"]
        (version,) = client.search_model_versions(f"name='{prefix}-teacher'")
        assert version.run_id == runs[0].info.run_id  # registered from its own project's run
    assert client.get_experiment_by_name("ms2rgb") is None  # the default name was never used
    # one project cannot move the other's champion: its names are not this project's
    with pytest.raises(Ms2rgbError, match=r"'team-b-teacher' is not a registered model of this project.*team-a-"):
        promote_by_hand(roots["a"], load_params(roots["a"]), "team-b-teacher", 1, force=True)


# ---------------------------------------------------------------- a retrain tags its own runs only


def test_retrain_tagging_leaves_the_runs_of_another_flow_run_untouched(tmp_path: Path) -> None:
    """The runs a flow run makes carry its id down the run tree; tag_flow_run tags exactly those, even
    when another flow run's runs, or runs outside any flow, started later on the same store."""
    mine, theirs = "0b1c-retrain", "9f8e-other-flow"
    made: dict[str, list[str]] = {mine: [], theirs: []}
    for flow_run in (mine, theirs):  # the other flow run starts after this one: a time cut would take it
        tags = {tracking.FLOW_RUN_TAG: flow_run}
        with (
            tracking.pipeline_run(tmp_path, "ms2rgb", "pipeline", tags=tags) as parent,
            tracking.stage_run(tmp_path, "ms2rgb", "student", parent) as stage,
            stage.child("variant") as child,
        ):
            made[flow_run] += [parent, stage.run_id, child.run_id]
    with tracking.stage_run(tmp_path, "ms2rgb", "teacher") as alone:  # `ms2rgb stage teacher`: no flow run
        pass

    tagged = tracking.tag_flow_run(tmp_path, "ms2rgb", mine, {"ms2rgb.data_version": "abc123"})

    assert tagged == 3
    client = MlflowClient()
    for run_id in made[mine]:
        tags = client.get_run(run_id).data.tags
        assert (tags[tracking.FLOW_RUN_TAG], tags["ms2rgb.data_version"]) == (mine, "abc123")
    for run_id in [*made[theirs], alone.run_id]:
        tags = client.get_run(run_id).data.tags
        assert "ms2rgb.data_version" not in tags
        assert tags.get(tracking.FLOW_RUN_TAG) == (theirs if run_id in made[theirs] else None)
