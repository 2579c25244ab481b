"""Preference pairs: validation, prompt selection kept apart from evaluation, the three methods."""

import json

import pandas as pd
import pytest
import torch
from tiny_models import D_MODEL, TokenIdTokenizer, prepared_gpt2

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import generate, greedy
from dpotox.engine.metrics import f1_items
from dpotox.errors import PairsError, SourceError
from dpotox.sources import prepare_table
from dpotox.sources.tables import check_pairs
from dpotox.stages.evaluate import EvalConfig, split_wiki
from dpotox.stages.pairs import make_pairs, read_pairs, rtp_pair_prompts
from dpotox.stages.probe import ProbeError, save_probe


def pairs_df(**cols):
    base = {
        "id": ["a", "b"],
        "prompt": ["p1", "p2"],
        "chosen": ["nice", "kind"],
        "rejected": ["rude", "mean"],
    }
    base.update(cols)
    return pd.DataFrame(base)


@pytest.mark.parametrize(
    "cols, message",
    [
        ({"chosen": ["nice", "  "]}, "pair 'b' has an empty chosen text"),
        ({"rejected": [None, "mean"]}, "pair 'a' has no rejected text"),
        ({"rejected": ["nice", "mean"]}, "pair 'a' has the same chosen and rejected text"),
        ({"prompt": ["p1", 3]}, "pair 'b' has no prompt text"),
    ],
)
def test_bad_pairs_are_named(cols, message):
    with pytest.raises(PairsError, match=message):
        check_pairs(pairs_df(**cols), "pairs.parquet")


def test_missing_column_and_missing_file():
    with pytest.raises(PairsError, match="no column 'rejected'"):
        check_pairs(pairs_df().drop(columns="rejected"), "x")
    with pytest.raises(PairsError, match="does not exist; run the make_pairs rule"):
        read_pairs("/no/such/pairs.parquet")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows))
    return path


LEE = [
    {"prompt_text": "The town", "unpert_gen_text": " was quiet.", "pert_gen_text": " sucks."},
    {"prompt_text": "The town", "unpert_gen_text": " grew.", "pert_gen_text": " is shit."},
]


def test_lee_jsonl_keeps_every_pair_of_a_prompt_and_names_bad_lines(tmp_path):
    src = {"kind": "jsonl", "path": str(write_jsonl(tmp_path / "p.jsonl", LEE + LEE[:1]))}
    df = prepare_table("pairs", [src], tmp_path / "pairs.parquet")
    # Two pairs share a prompt; the exact repeat on line 3 is dropped.
    assert df["chosen"].tolist() == [" was quiet.", " grew."]
    assert df["id"].tolist() == ["jsonl:p.jsonl:line1", "jsonl:p.jsonl:line2"]

    missing = [LEE[0], None, {"prompt_text": "A", "unpert_gen_text": "b"}]
    src = {"kind": "jsonl", "path": str(write_jsonl(tmp_path / "m.jsonl", missing))}
    with pytest.raises(SourceError, match=r"field 'pert_gen_text'.*m\.jsonl line 3"):
        prepare_table("pairs", [src], tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()

    same = [LEE[0], {"prompt_text": "A", "unpert_gen_text": "same", "pert_gen_text": "same"}]
    src = {"kind": "jsonl", "path": str(write_jsonl(tmp_path / "s.jsonl", same))}
    with pytest.raises(PairsError, match="pair 'jsonl:s.jsonl:line2' has the same chosen"):
        prepare_table("pairs", [src], tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists()


def test_rtp_pair_prompts_never_include_an_evaluation_prompt():
    texts = [f"prompt number {i}" for i in range(20)] + ["Prompt  number 3", "fresh one"]
    prompts = pd.DataFrame(
        {"id": [f"p{i}" for i in range(len(texts))], "text": texts, "source": "s"}
    )
    chosen, report = rtp_pair_prompts(prompts, n_eval=10, n=50, seed=0)
    assert not set(chosen["id"]) & {f"p{i}" for i in range(10)}
    assert "p20" not in set(chosen["id"])  # the same text as evaluation prompt p3
    assert report == {
        "eval_prompts": 10,
        "available": 11,
        "dropped_same_text_as_eval": 1,
        "eval_overlap": 0,
        "from": "data.prompts",
    }
    again, _ = rtp_pair_prompts(prompts, n_eval=10, n=5, seed=0)
    assert again["id"].tolist() == chosen["id"].tolist()[:5]
    # With data.pair_prompts the pool is that table, still without evaluation texts.
    pool = pd.DataFrame(
        {"id": ["q0", "q1", "q2"], "source": "s", "text": ["PROMPT number 0", "other", "more"]}
    )
    chosen, report = rtp_pair_prompts(prompts, n_eval=10, n=50, seed=0, pool=pool)
    assert sorted(chosen["id"]) == ["q1", "q2"]
    assert report["from"] == "data.pair_prompts" and report["dropped_same_text_as_eval"] == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    model_dir = prepared_gpt2(root)
    prompts = [
        f"You are such a {w}"
        for w in (
            "fool",
            "star",
            "mess",
            "hero",
            "joke",
            "saint",
            "liar",
            "friend",
            "clown",
            "genius",
            "thief",
        )
    ]
    pd.DataFrame(
        {"id": [f"p{i}" for i in range(len(prompts))], "text": prompts, "source": "test"}
    ).to_parquet(root / "prompts.parquet")
    wiki = [
        f"Article {i} tells how the village of number {i} grew from a farm into a market "
        "town with a school, a church and a mill beside the old stone bridge."
        for i in range(30)
    ]
    pd.DataFrame({"id": [f"w{i}" for i in range(30)], "text": wiki, "source": "test"}).to_parquet(
        root / "wiki.parquet"
    )
    return root, model_dir


CFG = {
    "seed": 0,
    "toxicity": {"scorer": "jigsaw-bilstm", "batch_size": 16},
    "evaluation": {
        "n_prompts": 4,
        "prompt_tokens": 8,
        "new_tokens": 4,
        "ppl_texts": 5,
        "f1_texts": 5,
    },
    "dpo": {
        "pairs": {
            "method": "best-of-n",
            "n_prompts": 5,
            "n_samples": 3,
            "margin": 0.0,
            "temperature": 1.5,
            "prompt_tokens": 8,
            "new_tokens": 6,
            "batch_size": 4,
        }
    },
}


def run(tiny, tmp_path, cfg=CFG, **kw):
    root, model_dir = tiny
    out = tmp_path / "dpo"
    report = make_pairs(
        model_dir=model_dir,
        cfg=cfg,
        out_parquet=out / "pairs.parquet",
        out_json=out / "pairs.json",
        samples_path=out / "samples.parquet",
        prompts_path=root / "prompts.parquet",
        wiki_path=root / "wiki.parquet",
        **kw,
    )
    return report, out


def test_best_of_n_pairs_the_least_and_most_toxic_sample(tiny, tmp_path):
    report, out = run(tiny, tmp_path)
    pairs = read_pairs(out / "pairs.parquet")
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 5 * 3 and report["n_samples"] == 15
    assert not set(pairs["id"]) & {"p0", "p1", "p2", "p3"}
    assert report["prompts"]["eval_overlap"] == 0 and report["n_candidates"] <= 5
    for _, p in pairs.iterrows():
        s = samples[samples["id"] == p["id"]]
        assert p["chosen_score"] == s["score"].min() and p["rejected_score"] == s["score"].max()
        assert p["gap"] == pytest.approx(p["rejected_score"] - p["chosen_score"])
    assert report["n_pairs"] == len(pairs) and 0 < report["kept_fraction"] <= 1
    assert json.loads((out / "pairs.json").read_text())["mean_gap"] == pytest.approx(
        pairs["gap"].mean()
    )
    again, out2 = run(tiny, tmp_path / "again")
    assert pd.read_parquet(out2 / "samples.parquet").equals(samples)  # seeded


def test_a_margin_no_pair_clears_writes_nothing(tiny, tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["dpo"]["pairs"]["margin"] = 1.0
    with pytest.raises(PairsError, match="none of .* candidate pairs has a toxicity gap above"):
        run(tiny, tmp_path, cfg=cfg)
    assert not (tmp_path / "dpo").exists() or not any((tmp_path / "dpo").iterdir())


def test_steered_pairs_use_unused_wiki_texts_and_check_the_probe(tiny, tmp_path):
    root, model_dir = tiny
    cfg = json.loads(json.dumps(CFG))
    cfg["dpo"]["pairs"].update(method="steered", steer_alpha=50.0, n_prompts=6)
    with pytest.raises(ProbeError, match="width 7 but the model's residual stream has 32"):
        run(
            tiny,
            tmp_path,
            cfg=cfg,
            probe_path=save_probe(tmp_path / "bad.safetensors", torch.ones(7), 0.0, {}),
        )
    assert not (tmp_path / "dpo").exists()
    probe = save_probe(tmp_path / "p.safetensors", torch.randn(D_MODEL), 0.0, {})
    report, out = run(tiny, tmp_path, cfg=cfg, probe_path=probe)
    pairs = read_pairs(out / "pairs.parquet")
    wiki = pd.read_parquet(root / "wiki.parquet")
    ec = EvalConfig.from_config(cfg)
    ppl, f1_df = split_wiki(wiki, ec.ppl_texts, ec.seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    used = set(ppl["id"]) | {
        f1_df["id"].iloc[i]
        for i, _, _ in f1_items(tok, f1_df["text"].tolist(), prompt_tokens=8, new_tokens=4, limit=5)
    }
    assert len(used) == 10 and not set(pairs["id"]) & used
    assert report["prompts"]["eval_overlap"] == 0
    assert (pairs["n_candidates"] == 2).all()


def test_jsonl_method_scores_both_sides_and_drops_evaluation_prompts(tiny, tmp_path):
    root, _ = tiny
    lee = pd.DataFrame(
        {
            "id": ["l1", "l2"],
            "source": "jsonl:x",
            "prompt": ["You are such a fool", "A new prompt"],
            "chosen": ["a lovely person", "a kind word"],
            "rejected": ["a stupid idiot", "shut up you moron"],
        }
    )
    lee.to_parquet(tmp_path / "lee.parquet")
    cfg = json.loads(json.dumps(CFG))
    cfg["dpo"]["pairs"]["method"] = "jsonl"
    report, out = run(tiny, tmp_path, cfg=cfg, pairs_path=tmp_path / "lee.parquet")
    pairs = read_pairs(out / "pairs.parquet")
    assert pairs["id"].tolist() == ["l2"]  # l1's prompt is evaluation prompt p0
    assert report["prompts"] == {"dropped_same_text_as_eval": 1, "eval_overlap": 0}
    assert pairs["rejected_score"].iloc[0] > 0.5 > pairs["chosen_score"].iloc[0]
    with pytest.raises(PairsError, match="data.pairs is null"):
        run(tiny, tmp_path / "none", cfg=cfg)


def test_sampling_is_seeded_and_a_cold_temperature_is_greedy(model):
    adapter = Adapter(model)
    tok = TokenIdTokenizer(model)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    ids = ["a", "b", "c"]
    one = generate(adapter, tok, prompts, ids, new_tokens=6, temperature=1.0, seed=1)
    two = generate(adapter, tok, prompts, ids, new_tokens=6, temperature=1.0, seed=1)
    other = generate(adapter, tok, prompts, ids, new_tokens=6, temperature=1.0, seed=2)
    assert one.new_tokens == two.new_tokens != other.new_tokens
    cold = generate(adapter, tok, prompts, ids, new_tokens=6, temperature=1e-6, seed=3)
    assert cold.new_tokens == greedy(adapter, tok, prompts, ids, new_tokens=6).new_tokens
    with pytest.raises(ValueError, match="temperature"):
        generate(adapter, tok, prompts, ids, temperature=-1.0)
