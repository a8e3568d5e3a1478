"""Where landing scenes come from and go to: plain entry names, and folders of any fsspec file system.

The watch (flows/landing.py) lists a landing location and moves bad scenes into a quarantine; either
may be a local folder or an fsspec URL (s3://, memory://). A name a listing returns is used to build a
path only when it is one plain file name (`name_problem`): never `../x`, an absolute path or a name
with control characters, so a hostile store cannot make the watch read or write outside its folders.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ms2rgb.tasks.data.atomic import write_text_atomic
from ms2rgb.tasks.errors import Ms2rgbError

CHUNK = 1 << 20  # bytes per read when hashing or copying


class UnsafeName(Ms2rgbError):
    """A landing entry's name would address something outside the folder it is listed in."""


# ---------------------------------------------------------------- names and locations


def name_problem(name: str) -> str | None:
    """Why `name` is not one plain file name (None when it is): it must not climb, be absolute or nest."""
    if not name:
        return "the name is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "the name holds control characters"
    if name in (".", ".."):
        return "the name refers to a folder, not an entry in it"
    if "/" in name or "\\" in name or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        return "the name is a path (absolute, or with folder parts such as ../), not a plain file name"
    if len(name.encode()) > 255:
        return "the name is longer than 255 bytes"
    return None


def safe_child(base: Path, name: str) -> Path:
    """`base / name`, refusing any name that would land anywhere but directly inside `base`."""
    problem = name_problem(name)
    if problem:
        raise UnsafeName(f"{name!r}: {problem}; refused, nothing is written for it")
    child = base / name
    if child.resolve().parent != base.resolve():  # a symlinked parent or anything else that escapes
        raise UnsafeName(f"{name!r}: resolves outside {base}; refused, nothing is written for it")
    return child


@dataclass(frozen=True)
class Location:
    """A folder of a local or fsspec file system."""

    fs: fsspec.AbstractFileSystem
    path: str  # in the file system's own terms, without a trailing slash
    url: str  # as configured, for messages

    @property
    def local(self) -> Path | None:
        return Path(self.path) if isinstance(self.fs, LocalFileSystem) else None

    def child(self, name: str) -> str:
        if self.local is not None:
            return str(safe_child(self.local, name))
        problem = name_problem(name)
        if problem:
            raise UnsafeName(f"{name!r}: {problem}; refused, nothing is written for it")
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.child(name)))


def open_location(root: Path, spec: str, create: bool = False) -> Location:
    """A configured location: an fsspec URL (anything with ://) or a folder, relative ones from `root`."""
    if "://" in spec:
        fs, path = url_to_fs(spec)
    else:
        folder = Path(spec).expanduser()
        fs, path = fsspec.filesystem("file"), str((folder if folder.is_absolute() else root / folder).resolve())
    location = Location(fs, path.rstrip("/") or "/", spec)
    if create:
        fs.makedirs(location.path, exist_ok=True)
    return location


def entry_name(base: str, path: str) -> str:
    """The name of a listed entry relative to the listed folder. A listing that returns something not
    directly inside it (a store key such as `drop/../x`, an absolute path) keeps its odd name, which
    name_problem then refuses."""
    prefix = base.rstrip("/") + "/"
    path = path.rstrip("/")
    return path[len(prefix) :] if path.startswith(prefix) else path


def write_text(location: Location, name: str, text: str) -> None:
    """A small text file directly inside `location` (atomically where it is local)."""
    if location.local is not None:
        write_text_atomic(safe_child(location.local, name), text)
    else:
        location.fs.pipe(location.child(name), text.encode())


def copy_tree(src_fs: fsspec.AbstractFileSystem, src: str, dst_fs: fsspec.AbstractFileSystem, dst: str) -> None:
    """Copy a file or a folder between file systems; every nested name must be a plain name."""
    if not src_fs.isdir(src):
        dst_fs.makedirs(str(PurePosixPath(dst).parent), exist_ok=True)
        with src_fs.open(src, "rb") as fin, dst_fs.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
        return
    for path in sorted(src_fs.find(src)):
        rel = entry_name(src, path)
        for part in rel.split("/"):
            problem = name_problem(part)
            if problem:
                raise UnsafeName(f"{src}: nested entry {rel!r}: {problem}; refused, nothing is written for it")
        copy_tree(src_fs, path, dst_fs, f"{dst}/{rel}")


def move(src: Location, name: str, dst: Location, dest_name: str, is_dir: bool) -> None:
    """Move one entry between (possibly different) file systems."""
    if src.local is not None and dst.local is not None:
        shutil.move(safe_child(src.local, name), safe_child(dst.local, dest_name))
        return
    source, target = src.child(name), dst.child(dest_name)
    if src.fs is dst.fs:
        src.fs.mv(source, target, recursive=is_dir)
        return
    copy_tree(src.fs, source, dst.fs, target)
    src.fs.rm(source, recursive=is_dir)
