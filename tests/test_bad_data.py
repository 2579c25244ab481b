"""Bad data files, class by class: every error names the file and its 1-based line (JSONL,
CSV) or row (Parquet) and the field; no row is dropped without being counted; a prepared
table made from other sources is not reused."""

import json
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dpotox.errors import SourceError
from dpotox.logs import rule_log
from dpotox.sources.tables import check_prepared, prepare_table, read_source


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"kind": "jsonl", "path": str(path)}


def test_files_of_one_name_in_two_folders_keep_every_row(tmp_path):
    a = _jsonl(tmp_path / "a" / "prompts.jsonl", [{"text": f"a{i}"} for i in range(3)])
    b = _jsonl(tmp_path / "b" / "prompts.jsonl", [{"text": f"b{i}"} for i in range(2)])
    out = tmp_path / "prompts.parquet"
    df = prepare_table("prompts", [a, b], out)
    assert len(df) == 5 and df["id"].is_unique
    assert json.loads(pq.read_schema(out).metadata[b"dpotox.rows_dropped"]) == {
        "empty_text": 0,
        "repeated_text": 0,
    }


def test_the_same_source_twice_gets_distinct_ids_and_its_repeats_are_counted(tmp_path):
    a = _jsonl(tmp_path / "p.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "  "}])
    out = tmp_path / "prompts.parquet"
    df = prepare_table("prompts", [a, a], out)
    assert list(df["text"]) == ["one", "two"]
    assert json.loads(pq.read_schema(out).metadata[b"dpotox.rows_dropped"]) == {
        "empty_text": 2,
        "repeated_text": 2,
    }


def test_a_repeated_id_in_one_source_names_both_lines(tmp_path):
    src = _jsonl(
        tmp_path / "p.jsonl",
        [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}, {"id": "x", "text": "three"}],
    )
    with pytest.raises(
        SourceError,
        match=r"data.prompts\[0\]: id 'x' \(field 'id'\) is given "
        r"twice, at .*p\.jsonl line 1 and .*p\.jsonl line 3",
    ):
        prepare_table("prompts", [src], tmp_path / "out.parquet")
    assert not list(tmp_path.glob("*out*"))


@pytest.mark.parametrize(
    "value, problem",
    [
        ("high", r"'high' \(str\), not a number"),
        (1.5, r"1\.5, outside \[0, 1\]"),
        (float("inf"), "inf"),
    ],
)
def test_a_score_of_the_wrong_type_or_range_names_file_line_and_field(tmp_path, value, problem):
    rows = [{"text": "fine", "score": 0.2}, {"text": "bad", "score": value}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = {"kind": "jsonl", "path": str(path), "columns": {"toxicity": "score"}}
    with pytest.raises(
        SourceError,
        match=rf"p\.jsonl line 2, field 'score': the value is "
        rf"{problem}",
    ):
        read_source(src, "prompts", key="data.prompts[0]")


def test_scores_are_floats_and_missing_ones_stay_missing(tmp_path):
    src = _jsonl(
        tmp_path / "p.jsonl",
        [{"text": "a", "toxicity": 0.5}, {"text": "b"}, {"text": "c", "toxicity": 1}],
    )
    df = read_source(src, "prompts", key="k")
    assert str(df["toxicity"].dtype) == "Float64"
    assert df["toxicity"].isna().tolist() == [False, True, False]


def test_labels_in_csv_and_parquet_name_the_row(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("text,toxic\nfine,0\nbad,yes\n")
    with pytest.raises(
        SourceError,
        match=r"l\.csv row 2 \(line 3\), field 'toxic': the value "
        r"is 'yes'",
    ):
        read_source(
            {"kind": "csv", "path": str(csv), "columns": {"label": "toxic"}}, "probe_texts", key="k"
        )
    parquet = tmp_path / "l.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0.0, None, 7.0]}).to_parquet(parquet)
    with pytest.raises(
        SourceError,
        match=r"l\.parquet row 3, field 'label': the value is 7\.0, "
        r"outside",
    ):
        read_source({"kind": "parquet", "path": str(parquet)}, "probe_texts", key="k")
    pd.DataFrame({"text": ["a", "b"], "label": [1.0, None]}).to_parquet(parquet)
    labels = read_source({"kind": "parquet", "path": str(parquet)}, "probe_texts", key="k")
    assert labels["label"].tolist()[0] == 1 and labels["label"].isna().tolist() == [False, True]


def test_a_prepared_table_of_other_sources_is_not_reused(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"text": "one"}, {"text": "two"}])
    out = tmp_path / "resources" / "data" / "prompts.parquet"
    prepare_table("prompts", [src], out)
    check_prepared(out, "prompts", [src])
    other = {**src, "limit": 1}
    with pytest.raises(
        SourceError,
        match=r"prompts\.parquet was prepared from other sources than "
        r"data\.prompts of this config .*--forcerun "
        r"prepare_data",
    ):
        check_prepared(out, "prompts", [other])
    # Every rule script checks its prepared inputs when it starts.
    smk = SimpleNamespace(
        rule="evaluate",
        wildcards={},
        log=[],
        input=[str(out)],
        config={"data": {"prompts": [other]}},
    )
    with pytest.raises(SourceError, match="prepared from other sources"), rule_log(smk):
        pass
    pd.DataFrame({"text": ["x"]}).to_parquet(out)  # copied without its metadata
    with pytest.raises(SourceError, match="does not say which sources"):
        check_prepared(out, "prompts", [src])
