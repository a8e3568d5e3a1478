"""What a params edit or an operations-code edit makes stale: DVC's answer stays as fine as what a stage reads.

Params: every key a stage reads (`params.<section>` or `params.data.<key>`, through local aliases such
as `cfg = params.teacher`, in every file the stage loads) is one of its `params` in dvc.yaml, and no
entry there is coarser than what the stage reads, so e.g. only prepare depends on `data.segmentation`.
Operations code (the landing watch, its ledger, the retrain flow) is loaded by no stage and covered by
no stage's deps.
Then a real `dvc status` on a real DVC repository: every stage is recorded in dvc.lock over placeholder
files (`dvc commit`, nothing trained, a few seconds), a key or a file is changed, and DVC names the
stale stages. This checks dvc.yaml as DVC reads it; that a rerun of prepare then rewrites only the
splits whose tiles changed is checked in tests/test_layout.py (the cache, and slow: a new scene).
"""

from __future__ import annotations

import ast
import copy
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO
from pydantic import BaseModel
from test_layout import EXEMPT, all_modules, covered, loaded_files, stage_deps, stale

from ms2rgb.flows.stages import STAGE_MODULES
from ms2rgb.tasks.config import Params

# Read by every stage, or by the runner for every stage: allowed in any stage's params, required in none.
ALWAYS_ALLOWED = {
    "profile": "selects the profile whose values override any section",
    "profiles": "a profile may override any key a stage reads",
    "threads": "flows/stages.py pins torch's CPU threads before every stage (reductions split by thread count)",
    "compute.device": "flows/stages.py picks the torch device before every stage (CPU and CUDA numbers differ)",
    "compute.nproc": "flows/stages.py trains teacher and student on that many processes (other float sums)",
}
# Reads that cannot change what a stage computes.
READ_EXEMPT = {
    ("evaluate", ""): "the lineage record in reports/evaluate.json lists the resolved params; it computes nothing",
    ("compare", "compute"): "how many cells run at once and where: the same numbers (tests/test_parallel.py)",
    ("detector", "compute"): "the same for the detector's variants and seeds (tests/test_parallel.py)",
    ("pairs", "compute"): "the same for the pool's pseudo-labelling slices (tests/test_parallel.py)",
}
METHOD_A = ("teacher", "matcher", "pairs", "student", "compare")
# Operations: the flows that poll, ingest and retrain outside the stages.
OPERATIONS = ("ms2rgb.flows.watch", "ms2rgb.flows.retrain", "ms2rgb.flows.serve")


# ---------------------------------------------------------------- which params keys a file reads


def config_key(chain: list[str]) -> str | None:
    """`params.<chain>` as a params.yaml key (`evaluation.bootstrap` -> `evaluate.bootstrap`), "" for the
    whole Params (`params.model_dump()`), None when the chain names nothing of Params."""
    model: type[BaseModel] = Params
    parts: list[str] = []
    for attr in chain:
        field = model.model_fields.get(attr)
        if field is None:
            break
        parts.append(field.alias or attr)
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    if not parts and not (chain and hasattr(BaseModel, chain[0])):
        return None
    return ".".join(parts)


def _chain(node: ast.AST) -> tuple[list[str], ast.AST]:
    """`a.b.c` -> (["b", "c"], Name a)."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return attrs[::-1], node


def _scope_reads(scope: ast.AST) -> set[str]:
    """Keys read in one function (or module-level statement): `params.x.y` chains, and names bound to one
    (`cfg, data = params.teacher, params.data`) read through (`data.prepared_dir`) or passed on whole."""
    aliases: dict[str, list[str]] = {}
    bindings: set[int] = set()  # the right-hand sides that only bind an alias
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = (
                zip(target.elts, value.elts)
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                else [(target, value)]
            )
            for name, rhs in pairs:
                attrs, base = _chain(rhs)
                if isinstance(name, ast.Name) and isinstance(base, ast.Name) and base.id == "params" and attrs:
                    aliases[name.id] = attrs
                    bindings.add(id(rhs))
    inner = {id(n.value) for n in ast.walk(scope) if isinstance(n, ast.Attribute)}
    reads = set()
    for node in ast.walk(scope):
        if id(node) in inner or id(node) in bindings:
            continue
        if isinstance(node, ast.Attribute):
            attrs, base = _chain(node)
            if isinstance(base, ast.Name) and (base.id == "params" or base.id in aliases):
                key = config_key(attrs if base.id == "params" else aliases[base.id] + attrs)
                if key is not None:
                    reads.add(key)
        elif isinstance(node, ast.Name) and node.id in aliases and isinstance(node.ctx, ast.Load):
            key = config_key(aliases[node.id])  # passed on whole: every key below it counts as read
            if key is not None:
                reads.add(key)
    return reads


@cache
def params_reads(rel: str) -> frozenset[str]:
    """The params keys a file reads (Params is always called `params`: test_params_are_always_called_params)."""
    tree = ast.parse((REPO / rel).read_text(), filename=rel)
    scopes: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            scopes += node.body
        else:
            scopes.append(node)
    return frozenset(key for scope in scopes for key in _scope_reads(scope))


def stage_params_reads(stage: str) -> set[str]:
    """Keys read by the files the stage loads, logging-only modules (test_layout.EXEMPT) left out."""
    files = [rel for rel in loaded_files(STAGE_MODULES[stage]) if not any(rel.startswith(e) for e in EXEMPT)]
    return {key for rel in files for key in params_reads(rel) if (stage, key) not in READ_EXEMPT}


def stage_params(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, list[str]]:
    """stage -> its params keys (of params.yaml), as written in dvc.yaml."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: [str(p) for p in stage.get("params", [])] for name, stage in stages.items()}


def _covers(dep: str, key: str) -> bool:
    return dep == key or key.startswith(dep + ".")


def params_problems(params: Mapping[str, list[str]]) -> list[str]:
    """One line per key a stage reads but does not depend on, and per dependency coarser than its reads."""
    problems = []
    for stage in STAGE_MODULES:
        reads, deps = stage_params_reads(stage), params[stage]
        problems += [
            f"{stage}: reads params {k!r}, which its dvc.yaml params do not cover"
            for k in sorted(reads)
            if not any(_covers(d, k) for d in deps)
        ]
        for dep in deps:
            if dep in ALWAYS_ALLOWED or any(_covers(k, dep) for k in reads):
                continue
            below = sorted(k for k in reads if k.startswith(dep + "."))
            why = f"coarser than what it reads ({', '.join(below)})" if below else "never read"
            problems.append(f"{stage}: params {dep!r} in dvc.yaml is {why}")
    return problems


def test_params_are_always_called_params() -> None:
    """The reads above follow the name `params`; an argument of type Params by another name would hide them."""
    odd = [
        f"{rel}:{node.lineno}: {node.arg}: Params"
        for rel in all_modules()
        for node in ast.walk(ast.parse((REPO / rel).read_text()))
        if isinstance(node, ast.arg)
        and isinstance(node.annotation, ast.Name)
        and node.annotation.id == "Params"
        and node.arg != "params"
    ]
    assert not odd, "name the Params argument `params`:\n" + "\n".join(odd)


def test_the_reader_resolves_aliases_and_sections() -> None:
    source = (
        "def f(params):\n"
        "    cfg, data = params.evaluation, params.data\n"
        "    use(cfg)\n"
        "    path = data.prepared_dir\n"
        "    return params.data.segmentation.source, params.seed, params.teacher.model_dump()\n"
        "def g(params):\n"
        "    data = load()\n"
        "    return data.anything, params.model_dump()\n"
    )
    reads = set().union(*(_scope_reads(scope) for scope in ast.parse(source).body))
    assert reads == {"evaluate", "data.prepared_dir", "data.segmentation.source", "seed", "teacher", ""}


def test_each_stage_depends_on_exactly_the_params_it_reads() -> None:
    assert set(stage_params()) == set(STAGE_MODULES)
    problems = params_problems(stage_params())
    assert not problems, "dvc.yaml params differ from what the stages read:\n" + "\n".join(problems)


def test_method_a_does_not_depend_on_the_segmentation_tiles_params() -> None:
    for stage in (*METHOD_A, "detector", "evaluate"):  # they see the data through data/prepared only
        assert not any(_covers(d, "data.segmentation.source") for d in stage_params()[stage]), stage
    assert "data" in stage_params()["prepare"]  # prepare reads the whole section
    assert "data.prepared_dir" in stage_params_reads("teacher")  # the reader sees through to the keys


def test_the_checker_reports_a_coarse_or_missing_param() -> None:
    params = copy.deepcopy(stage_params())
    params["teacher"] = [("data" if p == "data.prepared_dir" else p) for p in params["teacher"]]
    params["student"].remove("student")
    problems = params_problems(params)
    assert problems[0] == "teacher: params 'data' in dvc.yaml is coarser than what it reads (data.prepared_dir)"
    assert "student: reads params 'student', which its dvc.yaml params do not cover" in problems
    assert all(p.startswith(("teacher: ", "student: ")) for p in problems)  # the other stages keep theirs


# ---------------------------------------------------------------- operations code is no stage's dependency


def test_operations_code_is_covered_by_no_stage() -> None:
    staged = set().union(*(loaded_files(m) for m in STAGE_MODULES.values()))
    operations = set().union(*(loaded_files(m) for m in OPERATIONS)) - staged
    assert "flows/landing.py" in operations and "flows/ledger.py" in operations
    deps = stage_deps()
    problems = [
        f"{rel}: no stage loads it, yet {stage}'s dvc.yaml deps cover it (move it out of the stages' folders)"
        for rel in sorted(operations)
        for stage in STAGE_MODULES
        if covered(rel, deps[stage])
    ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- what DVC itself says


def _placeholders(root: Path) -> None:
    """A file or folder for every dep and output dvc.yaml names that the project copy lacks."""
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("deps", "outs", "metrics"):
            for entry in stage.get(kind, []):
                rel = str(next(iter(entry))) if isinstance(entry, dict) else str(entry)
                path = root / rel
                if path.exists():
                    continue
                if Path(rel).suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{rel}\n")
                else:
                    path.mkdir(parents=True)
                    (path / "placeholder").write_text(f"{rel}\n")


@pytest.fixture
def recorded(project: Path) -> Path:
    """The project with every stage recorded in dvc.lock over placeholder files: nothing is stale."""
    _placeholders(project)
    subprocess.run([str(DVC), "commit", "--force", "--quiet"], cwd=project, check=True, capture_output=True)
    assert stale(project) == set()
    return project


def set_param(root: Path, dotted: str, value: object) -> None:
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_new_segmentation_source_makes_only_prepare_stale(recorded: Path) -> None:
    for source in ("folder", "scenes"):
        set_param(recorded, "data.segmentation.source", source)
        assert stale(recorded) == {"prepare"}, source  # no training stage: their data files decide
    set_param(recorded, "data.segmentation.shares", {"captions": 0.2, "fewshot": 0.4, "seg_test": 0.4})
    assert stale(recorded) == {"prepare"}
    set_param(recorded, "teacher.lr", 0.002)  # a key a stage reads still counts
    assert stale(recorded) == {"prepare", "teacher"}


def test_operations_and_page_edits_leave_the_models_fresh(recorded: Path) -> None:
    for rel in ("flows/landing.py", "flows/ledger.py", "flows/locations.py", "flows/watch.py", "flows/retrain.py"):
        with (recorded / rel).open("a") as fh:
            fh.write("\n# an edit to operations code\n")
    set_param(recorded, "landing.stable_polls", 3)
    assert stale(recorded) == set()
    # the page only: evaluate writes it, compare draws its own table and figure
    (recorded / "tasks" / "report" / "templates" / "index.html.j2").write_text("<!-- edited -->\n", "utf-8")
    assert stale(recorded) == {"evaluate"}


def test_a_new_scene_makes_stale_only_what_reads_data_scenes(recorded: Path) -> None:
    scene = recorded / "data" / "scenes" / "newscene"
    scene.mkdir()
    (scene / "manifest.parquet").write_bytes(b"new scene\n")
    # teacher, matcher and detector read none of the files a new pool scene changes (test_layout.py, slow)
    assert stale(recorded) == {"prepare", "validate"}
