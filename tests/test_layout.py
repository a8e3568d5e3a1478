"""DVC's answer to "what is stale" is honest and as fine as the data.

Code: every project file a stage imports (transitively, module- and function-level imports) is
covered by that stage's `deps` in dvc.yaml; the import graph has no cycle, no stage imports
another stage, and `models/` stays free of the pipeline tools.
Data: a split's cache array and index depend on that split alone, each stage lists the files of
exactly the splits it reads, training refuses splits without a validation stamp, and (slow) a
scene ingested into the pool makes stale only prepare, validate, pairs and student, and an edit to
the landing watch that ingests it nothing more. Params deps: tests/test_params_deps.py.
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import rasterio
import yaml
from conftest import DVC, PROJECT_FILES, REPO, copy_project
from helpers_data import make_dataset, meadow
from helpers_params import repo_params

from ms2rgb.flows.stages import STAGE_MODULES
from ms2rgb.tasks.data.cache import build_cache, cache_name, index_name, open_split
from ms2rgb.tasks.data.geotiff import sha256_of
from ms2rgb.tasks.data.legend import LEGEND_FILE
from ms2rgb.tasks.data.manifest import read_manifest
from ms2rgb.tasks.data.validated import PASSED_DIR, require_validated, stamp_path, write_stamps
from ms2rgb.tasks.errors import DataError

PACKAGES = {"ms2rgb.tasks": "tasks", "ms2rgb.models": "models", "ms2rgb.flows": "flows"}
# Modules a stage may import without listing them in its deps: they do nothing but log or describe
# errors, so editing them cannot change what a stage writes (and a reworded log line should not
# retrain every model).
EXEMPT = {
    "tasks/tracking/": "only talks to MLflow (runs, logged models, registry aliases)",
    "tasks/errors.py": "only describes errors",
    "tasks/training/progress.py": "only prints and logs training progress",
}
# Files of the source tree a module reads at run time: covered like the module's own code.
READ_BY_MODULE = {
    "models/clip_backbone.py": ("models/clip_configs/*.json",),
    "tasks/report/html.py": ("tasks/report/templates/*",),  # the page's markup
}
PIPELINE_TOOLS = ("prefect", "mlflow", "dvc")


# ---------------------------------------------------------------- the import graph


def module_file(name: str) -> str | None:
    """Repository path of a project module (`ms2rgb.tasks.data.cache` -> tasks/data/cache.py), else None."""
    for prefix, folder in PACKAGES.items():
        if name == prefix or name.startswith(prefix + "."):
            rel = Path(folder, *name[len(prefix) + 1 :].split(".")) if name != prefix else Path(folder)
            for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
                if (REPO / candidate).is_file():
                    return candidate.as_posix()
            return None
    return None


def module_name(rel: str) -> str:
    """tasks/data/cache.py -> ms2rgb.tasks.data.cache; tasks/data/__init__.py -> ms2rgb.tasks.data."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "ms2rgb." + ".".join(parts)


def parent_packages(name: str) -> list[str]:
    """__init__ files of the packages above a project module (ms2rgb itself has none)."""
    parts = name.split(".")
    return [f for f in (module_file(".".join(parts[:i])) for i in range(2, len(parts))) if f]


@cache
def imported_names(rel: str) -> tuple[str, ...]:
    """Every module name a file imports, at module level or inside functions (relative ones resolved)."""
    tree = ast.parse((REPO / rel).read_text(), filename=rel)
    package = module_name(rel) if rel.endswith("__init__.py") else module_name(rel).rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            names += [f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")]
    return tuple(dict.fromkeys(names))


@cache
def project_imports(rel: str) -> tuple[str, ...]:
    """Project files `rel` imports directly (the imported modules themselves, not their packages)."""
    found = []
    for name in imported_names(rel):
        if name.split(".")[0] == "ms2rgb":
            target = module_file(name)
            assert target, f"{rel} imports {name}, which is no file of the project"
            found.append(target)
    return tuple(dict.fromkeys(found))


def loaded_files(module: str) -> set[str]:
    """Every project file importing `module` loads: its imports, transitively, and their packages."""
    start = module_file(module)
    assert start, f"{module} is no file of the project"
    seen: set[str] = set()
    todo = [start, *parent_packages(module)]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for target in project_imports(rel):
            todo += [target, *parent_packages(module_name(target))]
    return seen


def all_modules() -> list[str]:
    return sorted(
        p.relative_to(REPO).as_posix()
        for folder in PACKAGES.values()
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    )


# ---------------------------------------------------------------- dvc.yaml code deps


def stage_deps(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, list[str]]:
    """stage -> its deps, as written in dvc.yaml."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: [str(d) for d in stage.get("deps", [])] for name, stage in stages.items()}


def covered(rel: str, deps: list[str]) -> bool:
    """A dep covers a file that equals it or lies under it."""
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def uncovered_code(deps: Mapping[str, list[str]]) -> list[str]:
    """One line per project file (or file a module reads) that a stage loads but its deps miss."""
    problems = []
    for stage, module in STAGE_MODULES.items():
        if stage not in deps:
            problems.append(f"{stage}: no stage of that name in dvc.yaml")
            continue
        for rel in sorted(loaded_files(module)):
            if not any(rel == e or rel.startswith(e) for e in EXEMPT) and not covered(rel, deps[stage]):
                problems.append(f"{stage}: imports {rel}, which its dvc.yaml deps do not cover")
            for pattern in READ_BY_MODULE.get(rel, ()):
                for data in sorted(p.relative_to(REPO).as_posix() for p in REPO.glob(pattern)):
                    if not covered(data, deps[stage]):
                        problems.append(f"{stage}: {rel} reads {data}, which its dvc.yaml deps do not cover")
    return problems


def test_every_imported_project_file_is_a_dependency_of_its_stage() -> None:
    assert set(STAGE_MODULES) == set(stage_deps()), "flows/stages.py and dvc.yaml name different stages"
    problems = uncovered_code(stage_deps())
    assert not problems, "dvc.yaml deps miss files the stage loads:\n" + "\n".join(problems)


def test_detector_covers_the_clip_configs_it_reads() -> None:
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "models" / "clip_configs").glob("*.json"))
    assert configs, "models/clip_configs/*.json: no CLIP config found"
    assert "models/clip_backbone.py" in loaded_files(STAGE_MODULES["detector"])
    assert all(covered(c, stage_deps()["detector"]) for c in configs)


def test_the_checker_reports_a_removed_dependency() -> None:
    deps = copy.deepcopy(stage_deps())
    deps["teacher"].remove("tasks/training")
    problems = uncovered_code(deps)
    assert "teacher: imports tasks/training/loop.py, which its dvc.yaml deps do not cover" in problems
    assert all(p.startswith("teacher: ") for p in problems)  # the other stages keep their deps
    deps = copy.deepcopy(stage_deps())
    deps["detector"].remove("models")
    assert any(
        p.startswith("detector: models/clip_backbone.py reads models/clip_configs/") for p in uncovered_code(deps)
    )


# ---------------------------------------------------------------- import rules


def find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(graph.get(root, ()))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph.get(nxt, ())))
    return None


def test_import_graph_has_no_cycle() -> None:
    graph = {rel: project_imports(rel) for rel in all_modules()}
    assert find_cycle({"a": ("b",), "b": ("c",), "c": ("a",)}) == ["a", "b", "c", "a"]  # the finder works
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_module_imports_another_stage_module() -> None:
    stage_files = {module_file(m): stage for stage, m in STAGE_MODULES.items()}
    problems = [
        f"{stage} ({STAGE_MODULES[stage]}) loads the {stage_files[rel]} stage ({rel})"
        for stage, module in STAGE_MODULES.items()
        for rel in sorted(loaded_files(module))
        if rel in stage_files and stage_files[rel] != stage
    ]
    assert not problems, "\n".join(problems)


def test_models_never_import_the_pipeline_tools() -> None:
    problems = []
    for rel in all_modules():
        if rel.startswith("models/"):
            for name in imported_names(rel):
                top = name.split(".")[0]
                if top in PIPELINE_TOOLS or (top == "ms2rgb" and not name.startswith("ms2rgb.models")):
                    problems.append(f"{rel} imports {name}")
    assert not problems, "models/ must stay pure PyTorch:\n" + "\n".join(problems)


# ---------------------------------------------------------------- data deps as fine as the data


def module_reads(module: str) -> dict[str, tuple[str, ...]] | None:
    """A module's READS ({split: modalities}), read from its source (or the module it imports READS from)."""
    tree = ast.parse((REPO / module_file(module)).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "READS" for t in node.targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "READS" for a in node.names):
            return module_reads(node.module)
    return None


def stage_reads(stage: str) -> dict[str, tuple[str, ...]] | None:
    """The stage module's READS, without importing it."""
    return module_reads(STAGE_MODULES[stage])


def test_each_stage_depends_on_exactly_the_splits_it_reads() -> None:
    deps = stage_deps()
    for stage in ("prepare", "validate"):
        assert stage_reads(stage) is None
    assert {"data/raw", "data/scenes", "data/prepared"} <= set(deps["validate"])
    for stage in ("teacher", "matcher", "pairs", "student", "compare", "detector"):
        reads = stage_reads(stage)
        assert reads, f"{STAGE_MODULES[stage]} declares no READS"
        kinds = ("image", "mask") if stage == "detector" else ("image",)  # only the detector reads masks
        expected = {f"data/prepared/{cache_name(s, m, k)}" for s, ms in reads.items() for m in ms for k in kinds}
        expected |= {f"data/prepared/{index_name(s, m)}" for s, ms in reads.items() for m in ms}
        expected |= {(PASSED_DIR / f"{s}.json").as_posix() for s in reads}
        if stage == "detector":  # its class set: the legend of the masks
            expected.add(f"data/prepared/{LEGEND_FILE}")
        data = {d for d in deps[stage] if d.startswith(("data/", "reports/validate/"))}  # not upstream reports
        assert data == expected, f"{stage}: dvc.yaml data deps differ from its READS"
        source = (REPO / module_file(STAGE_MODULES[stage])).read_text()
        assert "require_validated(root, " in source, f"{stage} does not check the validation stamps"


def test_matcher_and_teacher_read_no_pool() -> None:
    assert "ms_pool" not in stage_reads("matcher") and "ms_pool" not in stage_reads("teacher")
    assert "rgb_train" not in stage_reads("matcher")


def test_prepare_depends_on_the_params_mask_folder_which_a_fresh_clone_holds() -> None:
    # dvc.yaml cannot read params for a dep path: the folder is written in both, and this keeps them equal.
    folder = repo_params().data.segmentation.folder
    assert folder in stage_deps()["prepare"], f"dvc.yaml: prepare's deps lack data.segmentation.folder={folder!r}"
    # DVC stops at a missing dep, so a committed file (copied by make_project too) keeps the folder in a clone.
    kept = [f for f in PROJECT_FILES if covered(f, [folder])]
    assert kept and all((REPO / f).is_file() for f in kept), f"{folder}: no committed file in PROJECT_FILES"
    ignored = subprocess.run(["git", "check-ignore", "-q", *kept], cwd=REPO).returncode == 0
    assert not ignored, f"{kept}: git-ignored, so a fresh clone lacks {folder}"


def _cache_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_split_cache_and_index_change_only_with_that_split(tmp_path: Path) -> None:
    manifest = read_manifest(make_dataset(tmp_path / "data", n_locations=12))
    first, again, grown = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_cache(manifest, tmp_path / "data", first, progress=lambda _: None)
    build_cache(manifest.sample(frac=1.0, random_state=1), tmp_path / "data", again, progress=lambda _: None)
    assert _cache_bytes(first) == _cache_bytes(again)  # deterministic, whatever the row order
    # Two new pool tiles (copies of MS tiles under new ids), as an ingested scene adds them.
    pool = manifest[manifest["modality"] == "ms"].head(2).copy()
    pool["id"], pool["split"] = ["scene-a", "scene-b"], "ms_pool"
    pool["location_id"], pool["class"] = ["scene-a", "scene-b"], pd.NA
    build_cache(pd.concat([manifest, pool], ignore_index=True), tmp_path / "data", grown, progress=lambda _: None)
    before, after = _cache_bytes(first), _cache_bytes(grown)
    assert set(after) - set(before) == {"ms_pool-ms.npy", "ms_pool-ms-index.parquet", "ms_pool-ms-mask.npy"}
    assert {name: before[name] for name in before} == {name: after[name] for name in before}
    # open_split reads the split's own index, in cache order, with the manifest's labels.
    tiles = open_split(grown, "ms_pool", "ms")
    assert tiles.ids == ["scene-a", "scene-b"] and tiles.labels.tolist() == [-1, -1] and tiles.masks is None
    assert open_split(grown, "test", "rgb", masks=True).masks is not None
    index = pd.read_parquet(grown / index_name("test", "ms"))
    assert index["cache_row"].tolist() == list(range(len(index))) and index["id"].is_monotonic_increasing


def test_a_rebuild_reads_only_the_splits_that_changed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    manifest = read_manifest(make_dataset(data, n_locations=12))
    first, grown, fresh = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_cache(manifest, data, first, progress=lambda _: None)
    pool = manifest[manifest["modality"] == "ms"].head(2).copy()
    pool["id"], pool["split"], pool["location_id"] = ["scene-a", "scene-b"], "ms_pool", ["scene-a", "scene-b"]
    # One test tile changes content (its manifest sha256 with it): that split must be read again.
    changed = manifest.copy()
    row = changed.index[(changed["split"] == "test") & (changed["modality"] == "rgb")][0]
    tile_path = data / changed.loc[row, "path"]
    with rasterio.open(tile_path, "r+") as tile:
        tile.write(tile.read() // 2)
    changed.loc[row, "sha256"] = sha256_of(tile_path)
    grown_manifest = pd.concat([changed, pool], ignore_index=True)
    lines: list[str] = []
    build_cache(grown_manifest, data, grown, progress=lines.append, previous=first)
    build_cache(grown_manifest, data, fresh, progress=lambda _: None)
    assert _cache_bytes(grown) == _cache_bytes(fresh)  # reuse changes no byte
    kept = {line.split(":")[1].strip() for line in lines if line.endswith("(unchanged: kept)")}
    assert "ms_pool/ms" not in kept and "test/rgb" not in kept and {"test/ms", "ms_train/ms"} <= kept
    # A split that had an unreadable tile is read again (the file may have been mended since).
    (grown / "unreadable.json").write_text(json.dumps([manifest[manifest["split"] == "ms_train"]["id"].iloc[0]]))
    lines.clear()
    build_cache(grown_manifest, data, tmp_path / "d", progress=lines.append, previous=grown)
    assert not any(line.startswith("cache: ms_train/ms") and line.endswith("kept)") for line in lines)
    assert any(line.startswith("cache: test/ms") and line.endswith("kept)") for line in lines)


def test_training_refuses_splits_without_a_passed_validation(tmp_path: Path) -> None:
    data, prepared = tmp_path / "data", tmp_path / "data" / "prepared"
    manifest = read_manifest(make_dataset(data, n_locations=12))
    build_cache(manifest, data, prepared, progress=lambda _: None)
    reads = {"ms_train": ("ms",), "test": ("ms", "rgb")}
    with pytest.raises(DataError) as missing:
        require_validated(tmp_path, prepared, reads)
    message = str(missing.value)
    assert "\n" not in message and message.startswith("reports/validate.json: split 'ms_train'")
    assert "`ms2rgb stage validate`" in message
    paths = write_stamps(tmp_path, manifest)
    require_validated(tmp_path, prepared, reads)  # passes
    stamp = json.loads(stamp_path(tmp_path, "test").read_text())
    assert set(stamp) == {"split", "tiles", "sha256", "modalities"} and stamp["split"] == "test"
    assert [p.read_bytes() for p in write_stamps(tmp_path, manifest.iloc[::-1])] == [p.read_bytes() for p in paths]
    # Tiles that changed after validation are refused too, naming the index.
    index = pd.read_parquet(prepared / index_name("test", "ms"))
    index.loc[0, "sha256"] = "0" * 64
    index.to_parquet(prepared / index_name("test", "ms"), index=False)
    with pytest.raises(DataError, match=r"test-ms-index.parquet changed since split 'test' passed validation"):
        require_validated(tmp_path, prepared, reads)
    require_validated(tmp_path, prepared, {"ms_train": ("ms",)})  # other splits are unaffected


def test_every_training_stage_refuses_to_run_before_validation(project: Path) -> None:
    from ms2rgb.flows.stages import run_stage

    for stage in ("teacher", "matcher", "pairs", "student", "compare", "detector"):
        with pytest.raises(
            DataError,
            match=r"^reports/validate\.json: split '\w+' has not passed validation "
            r"\(no valid stamp .*\)\. Fix: run `ms2rgb stage validate`",
        ):
            run_stage(stage, project)


# ---------------------------------------------------------------- the whole pipeline under DVC


def stale(root: Path, *targets: str) -> set[str]:
    """Names of the stages `dvc status` reports as changed."""
    out = subprocess.run(
        [str(DVC), "status", "--json", *targets], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return {name.rpartition(":")[2] for name in json.loads(out or "{}")}


def write_scene(path: Path, size: int = 128) -> Path:
    """A 13-band uint16 GeoTIFF of size x size pixels at 10 m: (size / 64)^2 pool tiles."""
    import rasterio
    from rasterio.transform import Affine

    array = meadow(7, size, size)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=13,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
    ) as dst:
        dst.write(array)
    return path


@pytest.fixture
def reproduced(reproduced_tiny: Path, tmp_path: Path) -> Path:
    return copy_project(reproduced_tiny, tmp_path / "project")


@pytest.mark.slow
def test_new_scene_makes_stale_only_the_stages_that_read_the_pool(reproduced: Path, tmp_path: Path) -> None:
    from ms2rgb.flows.cli import main

    root = reproduced
    assert stale(root) == set()
    assert (
        main(
            ["--root", str(root), "data", "ingest", str(write_scene(tmp_path / "scene.tif")), "--scene-id", "newscene"]
        )
        == 0
    )
    # `dvc status` compares each stage with its own deps: both stages that read data/scenes.
    assert stale(root) == {"prepare", "validate"}
    ran = subprocess.run([str(DVC), "repro", "validate"], cwd=root, capture_output=True, text=True, check=True)
    assert "Running stage 'prepare'" in ran.stdout and "Running stage 'validate'" in ran.stdout
    # prepare rewrote every split's files, with the same bytes except ms_pool's; validate rewrote
    # every stamp, with the same bytes except ms_pool's.
    assert stale(root) == {"pairs", "student", "compare"}  # teacher, matcher and detector stay fresh
    landing = root / "flows" / "landing.py"  # the watch that ingests such scenes is operations code
    landing.write_text(landing.read_text() + "\n# an edit to the landing watch\n")
    assert stale(root) == {"pairs", "student", "compare"}
    loop = root / "tasks" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n# an edit to the training layer\n")
    assert stale(root, "teacher") == {"teacher"}


def test_every_package_folder_is_installed() -> None:
    """A folder left out of pyproject's package list would be missing from a wheel install."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"ms2rgb.models.clip_configs"}  # data only: the JSON model configs
    for top in ("tasks", "models", "flows"):
        for init in (REPO / top).rglob("__init__.py"):
            found.add("ms2rgb." + ".".join(init.parent.relative_to(REPO).parts))
    assert listed == found
