"""Every repository path the docs name exists, so a reader who follows one finds the file.

Read: README.md, docs/*.md, dvc.yaml, params.yaml, the Makefile, and every docstring and comment of
the Python files under tasks/, models/, flows/, bench/ and tests/. A path is anything that starts
with one of those folders or docs/ (`tasks/data/cache.py`, `models/clip_configs/`, `docs/methods.md`).
`<stage>`-style placeholders and `*` must match at least one file; `tasks/detection/data.shot_groups`
(a module and a name in it) must name something the module defines. Generated outputs (artifacts/,
data/, reports/) exist only after a run and are not checked.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator

from conftest import REPO

ROOTS = ("tasks", "models", "flows", "docs", "bench", "tests")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./*<>-]*)")
DOCS = ("README.md", "dvc.yaml", "params.yaml", "Makefile")


def python_text(rel: str) -> Iterator[str]:
    """The docstrings and comments of one Python file."""
    source = (REPO / rel).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.string


def documents() -> Iterator[tuple[str, str]]:
    """(file, text) for every document and every piece of Python prose the test reads."""
    for rel in [*DOCS, *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]:
        yield rel, (REPO / rel).read_text(encoding="utf-8")
    for top in ("tasks", "models", "flows", "bench", "tests"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                rel = path.relative_to(REPO).as_posix()
                yield from ((rel, text) for text in python_text(rel))


def defined_names(rel: str) -> set[str]:
    """Top-level functions, classes and assigned names of a module."""
    names = set()
    for node in ast.parse((REPO / rel).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def problem(named: str) -> str | None:
    """Why a named path does not lead anywhere (None when it does)."""
    path = named.rstrip(".")
    if "<" in path or "*" in path:
        pattern = re.sub(r"<[^>]*>", "*", path)
        return None if any(REPO.glob(pattern)) else "matches no file"
    if (REPO / path).exists():
        return None
    folder, _, last = path.rpartition("/")
    stem, dot, attr = last.partition(".")
    module = f"{folder}/{stem}.py"
    if dot and (REPO / module).is_file():  # `tasks/detection/data.shot_groups`: a module and a name in it
        return None if attr.split(".")[0] in defined_names(module) else f"{module} defines no {attr!r}"
    return "no such file or folder"


def wrong_paths() -> dict[tuple[str, str], str]:
    found = {}
    for rel, text in documents():
        for match in PATH.finditer(text):
            named = match.group(1).rstrip(".,;")
            why = problem(named)
            if why:
                found[(rel, named)] = why
    return found


def test_the_checker_resolves_placeholders_globs_and_module_names() -> None:
    assert problem("tasks/<stage>.py") is None and problem("models/clip_configs/*.json") is None
    assert problem("tasks/data/") is None and problem("docs/design.md") is None
    assert problem("tasks/detection/data.shot_groups") is None
    assert problem("tasks/detection/data.no_such_name") == "tasks/detection/data.py defines no 'no_such_name'"
    assert problem("tasks/no_such_module.py") == "no such file or folder"
    assert problem("tasks/<nothing>.yaml") == "matches no file"


def test_every_path_the_docs_name_exists() -> None:
    found = wrong_paths()
    wrong = [f"{rel}: names {named}: {why}" for (rel, named), why in sorted(found.items())]
    assert not wrong, "paths that lead nowhere (fix the text, or the path):\n" + "\n".join(wrong)
