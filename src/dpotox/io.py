"""Writing outputs so that a file is complete or absent, never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def share(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (temp files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_parquet(df: pd.DataFrame, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
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
    """Write a TSV of every file under ``paths`` (files or folders): path, bytes. Returns the count."""
    rows = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        rows += [(str(f), f.stat().st_size) for f in files if not f.name.startswith(".")]
    with atomic_path(out) as tmp:
        tmp.write_text("path\tbytes\n" + "".join(f"{f}\t{n}\n" for f, n in rows))
    return len(rows)
