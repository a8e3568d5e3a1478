"""Whole-or-nothing writes (tasks/data/atomic.py): files and folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ms2rgb.tasks.data.atomic import swap_in_dir, write_atomic, write_json_atomic, write_text_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.bin"  # the folder is created
    write_atomic(path, lambda tmp: tmp.write_bytes(b"old"))
    assert write_atomic(path, lambda tmp: tmp.write_bytes(b"new")) == path
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_text_atomic(path, "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failing_writer_creates_nothing_where_there_was_nothing(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_text("x")
        raise OSError("no")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "model.pt", fail)
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_indents_ends_with_newline_and_uses_default(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "r.json", {"a": 1, "p": tmp_path}, default=str)
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": 1, "p": str(tmp_path)}
    assert text == json.dumps({"a": 1, "p": str(tmp_path)}, indent=2) + "\n"
    with pytest.raises(TypeError):  # not JSON-able without a default: nothing is written
        write_json_atomic(tmp_path / "bad.json", {"x": object()}, default=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_swap_in_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    final = _folder(tmp_path / "prepared", {"a.npy": "old a", "stale.npy": "only in the old run"})
    tmp = _folder(tmp_path / "prepared.tmp", {"a.npy": "new a", "b.npy": "new b"})
    assert swap_in_dir(tmp, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["a.npy", "b.npy"]  # no file of the old folder survives
    assert (final / "a.npy").read_text() == "new a"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # neither the temp nor the old folder is left


def test_swap_in_dir_into_a_new_place_and_over_a_leftover_backup(tmp_path: Path) -> None:
    tmp = _folder(tmp_path / "raw.tmp", {"m": "1"})
    swap_in_dir(tmp, tmp_path / "raw")
    assert (tmp_path / "raw" / "m").read_text() == "1"
    _folder(tmp_path / "raw.old-raw.tmp", {"junk": ""})  # as if a run died mid-swap
    swap_in_dir(_folder(tmp_path / "raw.tmp", {"m": "2"}), tmp_path / "raw")
    assert (tmp_path / "raw" / "m").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_swap_in_dir_keeps_the_old_folder_when_the_new_one_cannot_move_in(tmp_path: Path) -> None:
    final = _folder(tmp_path / "scene", {"manifest.parquet": "stored"})
    with pytest.raises(OSError):
        swap_in_dir(tmp_path / "missing.partial", final)
    assert (final / "manifest.parquet").read_text() == "stored"
    assert [p.name for p in tmp_path.iterdir()] == ["scene"]
