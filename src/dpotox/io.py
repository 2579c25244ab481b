"""Writing outputs so that a file is complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def share(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (temp files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# Folders being written live in this folder beside their target, one level deeper than it,
# so that no glob over the outputs (activations/*/layer=*/*.parquet) reads a half-written one.
PARTIAL = ".partial"


def clear_stale(path: str | Path) -> None:
    """Remove what an interrupted writer of ``path`` left: staging folders and temporary
    files of this output only (one job writes one output, so none of them is in use)."""
    path = Path(path)
    for old in (path.parent / PARTIAL).glob(f"{glob.escape(path.name)}.*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        if old.is_file():
            old.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); outputs are meant to be shared like any other.
    share(tmp)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(
    path: str | Path, *, staging: str | Path | None = None, publish: bool = True
) -> Iterator[Path]:
    """Yield an empty staging folder (in :data:`PARTIAL` beside ``path``); when the block
    succeeds, make its files shared and rename it to ``path`` (replacing an older one); on
    error, remove it. What an earlier, interrupted writer left is removed first.

    ``staging`` names the folder (default: a fresh name), for writers in several processes
    that must agree on it; a process with ``publish=False`` only gets the name and leaves
    creating, renaming and removing to the one process that publishes.
    """
    path = Path(path)
    if not publish:
        if staging is None:
            raise ValueError("atomic_dir(publish=False) needs the staging folder's name")
        yield Path(staging)
        return
    parts = path.parent / PARTIAL
    clear_stale(path)
    # Another output's writer may remove an empty .partial/ at any moment: create it again.
    for attempt in range(3):
        parts.mkdir(parents=True, exist_ok=True)
        try:
            if staging is None:
                tmp = Path(tempfile.mkdtemp(dir=parts, prefix=f"{path.name}."))
            else:
                tmp = Path(staging)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        yield tmp
        # Temporary folders, and some writers, make their files private.
        for f in [tmp, *tmp.rglob("*")]:
            share(f)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            parts.rmdir()  # only if no other output of the folder is being written


def write_json(data: Any, path: str | Path, *, indent: int = 1, allow_nan: bool = True) -> Path:
    """Write ``data`` as JSON (``indent`` spaces, a final newline), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n")
    return Path(path)


def write_parquet(
    df: pd.DataFrame, path: str | Path, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``df`` as Parquet (no pandas index), with string key-value ``metadata``, atomically."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_manifest(paths: list[str], out: str | Path) -> int:
    """Write a TSV of every file under ``paths`` (files or folders): path, bytes. Returns the
    count."""
    rows = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        rows += [(str(f), f.stat().st_size) for f in files if not f.name.startswith(".")]
    with atomic_path(out) as tmp:
        tmp.write_text("path\tbytes\n" + "".join(f"{f}\t{n}\n" for f, n in rows))
    return len(rows)
