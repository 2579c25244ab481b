"""The papers' tables built from hand-made evaluation outputs (no models), and the packaged
published numbers."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from dpotox.errors import DpotoxError
from dpotox.outputs.evals import paired_bootstrap
from dpotox.outputs.tables import (
    PUBLISHED_COLUMNS,
    TablesError,
    build_tables,
    label,
    load_published,
    select_rows,
)
from dpotox.plan.outputs import RESULT_TABLES as TABLES
from dpotox.plan.outputs import result_table_files as table_files

IDS = [f"p{i}" for i in range(8)]


def write_eval(d, condition, scores, **extra):
    """One condition's outputs as rule evaluate writes them: per-prompt Parquet + summary JSON."""
    scores = np.asarray(scores, dtype=float)
    pd.DataFrame(
        {"id": IDS[: len(scores)], "prompt": "x", "continuation": "a b", "score": scores}
    ).to_parquet(d / f"{condition}.parquet", index=False)
    summary = {
        "condition": condition,
        "toxicity": float(scores.mean()),
        "toxicity_ci_low": float(scores.mean()) - 0.05,
        "toxicity_ci_high": float(scores.mean()) + 0.05,
        "ci_level": 0.95,
        "log_ppl": 3.0,
        "ppl": math.exp(3.0),
        "f1": 0.2,
        "n_prompts": len(scores),
        "n_f1": 10,
        "ppl_note": None,
        "f1_note": None,
        "n_edited_neurons": 0 if condition in ("base", "dpo") else 12,
        "bootstrap_samples": 200,
        "settings": {"seed": 0},
    }
    summary.update(extra)
    (d / f"{condition}.json").write_text(json.dumps(summary))
    return summary


def const(v, n=8):
    return [v] * n


@pytest.fixture
def evald(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    rng = np.random.default_rng(1)
    write_eval(d, "base", const(0.5))
    write_eval(d, "dpo", const(0.1))
    write_eval(d, "patch-toxic-256", const(0.4))
    write_eval(
        d,
        "patch-toxic-256-per-prompt",
        rng.uniform(0.2, 0.5, 8),
        log_ppl=None,
        f1=None,
        ppl_note="per-prompt patching has no DPO activations for Wikipedia texts",
        f1_note="per-prompt patching has no DPO activations for Wikipedia texts",
    )
    for c in (
        "ablate-toxic-100",
        "ablate-toxic-20",
        "steer-probe-a8",
        "steer-probe-a4",
        "edit-probe-cos-b0.5-a0.2",
        "edit-probe-cos-b0.25-a0.2",
        "patch-tp",
        "patch-tp-an",
        "patch-toxic-interpretable",
        "patch-toxic-128",
        "dpo-scale-keys-top7-x10",
    ):
        write_eval(d, c, rng.uniform(0, 1, 8))
    return d


ALL = [
    "base",
    "dpo",
    "patch-toxic-256",
    "patch-toxic-256-per-prompt",
    "ablate-toxic-100",
    "ablate-toxic-20",
    "steer-probe-a8",
    "steer-probe-a4",
    "edit-probe-cos-b0.5-a0.2",
    "edit-probe-cos-b0.25-a0.2",
    "patch-tp",
    "patch-tp-an",
    "patch-toxic-interpretable",
    "patch-toxic-128",
    "dpo-scale-keys-top7-x10",
]


def build(evald, tmp_path, conditions=ALL, **kw):
    return build_tables(
        evald, conditions, "tiny", tmp_path / "out" / "tiny", n_neurons_total=1200, **kw
    )


def test_row_selection_and_order():
    assert select_rows("table1_ablation", ALL) == [
        "base",
        "ablate-toxic-20",
        "ablate-toxic-100",
        "patch-tp",
        "dpo",
        "dpo-scale-keys-top7-x10",
    ]
    assert select_rows("table2_interventions", ALL) == [
        "base",
        "steer-probe-a4",
        "steer-probe-a8",
        "dpo",
        "patch-toxic-interpretable",
        "patch-toxic-128",
        "patch-toxic-256",
        "patch-tp",
        "patch-tp-an",
        "edit-probe-cos-b0.25-a0.2",
        "edit-probe-cos-b0.5-a0.2",
    ]
    assert select_rows("table3_toxic_neurons", ALL) == [
        "patch-toxic-interpretable",
        "patch-toxic-128",
        "patch-toxic-256",
        "patch-toxic-256-per-prompt",
    ]
    assert select_rows("table12_steering", ALL) == ["base", "steer-probe-a4", "steer-probe-a8"]
    assert select_rows("table_per_prompt", ALL) == ["patch-toxic-256"]
    assert select_rows(
        "table19_editing",
        ["patch-increased", "dpo", "edit-probe-act-b0.5-a0.1", "patch-all", "base"],
    ) == ["base", "dpo", "patch-all", "patch-increased", "edit-probe-act-b0.5-a0.1"]


def test_labels():
    assert label("ablate-toxic-pos-200") == "Ablate top 200 positively activated toxic neurons"
    assert label("edit-probe-cos-b0.5-a0.2").endswith("beta=0.5 alpha=0.2")
    assert label("patch-tp-an-per-prompt") == "Patch TP+AN (per-prompt DPO activations)"
    assert label("something-else") == "something-else"


def test_only_evaluated_conditions_are_rows(evald, tmp_path):
    t = build(evald, tmp_path, ["base", "dpo"])
    assert t["table1_ablation"]["condition"].tolist() == ["base", "dpo"]
    assert t["table3_toxic_neurons"].empty and t["table_per_prompt"].empty


def test_recovered_share_by_hand(evald, tmp_path):
    t3 = build(evald, tmp_path)["table3_toxic_neurons"].set_index("condition")
    row = t3.loc["patch-toxic-256"]
    assert row["recovered_pct"] == pytest.approx(25.0)  # (0.5 - 0.4) / (0.5 - 0.1)
    # constant scores: every resample gives 25% too
    assert row["recovered_ci_low"] == pytest.approx(25.0)
    assert row["recovered_ci_high"] == pytest.approx(25.0)
    assert row["n_neurons"] == 12 and row["pct_of_mlp_neurons"] == pytest.approx(1.0)
    assert "patch-toxic-256-per-prompt" in t3.index


def test_paired_bootstrap_contains_point_and_is_seeded():
    rng = np.random.default_rng(0)
    cols = rng.uniform(0, 1, (50, 2))

    def diff(m):
        return m[..., 1] - m[..., 0]

    a = paired_bootstrap(cols, diff, samples=500, level=0.9, seed=3)
    assert a[1] <= a[0] <= a[2] and a[1] < a[2]
    assert a == paired_bootstrap(cols, diff, samples=500, level=0.9, seed=3)
    assert a != paired_bootstrap(cols, diff, samples=500, level=0.9, seed=4)


def test_per_prompt_difference(evald, tmp_path):
    t = build(evald, tmp_path)["table_per_prompt"].iloc[0]
    assert t["twin"] == "patch-toxic-256-per-prompt"
    assert t["difference"] == pytest.approx(t["toxicity_per_prompt"] - t["toxicity"])
    assert t["difference_ci_low"] <= t["difference"] <= t["difference_ci_high"]


def test_papers_numbers_beside_matching_keys(evald, tmp_path):
    t = build(evald, tmp_path)
    t1 = t["table1_ablation"].set_index("condition")
    assert t1.loc["ablate-toxic-100", "paper_GPT-2-355M_toxicity"] == pytest.approx(0.403)
    assert t1.loc["ablate-toxic-100", "paper_GPT-2-355M_ppl"] == pytest.approx(21.99)
    assert math.isnan(t1.loc["ablate-toxic-20", "paper_GPT-2-355M_toxicity"])
    t2 = t["table2_interventions"].set_index("condition")
    assert t2.loc["dpo", "paper_GPT-2-355M_toxicity"] == pytest.approx(0.210)
    assert t2.loc["dpo", "paper_Mistral-7B_log_ppl"] == pytest.approx(2.01)
    assert t2.loc["patch-tp-an", "paper_Llama-3.1-8B_toxicity"] == pytest.approx(0.465)
    # steering: the paper's selected alpha whatever ours is, named in the label
    for c in ("steer-probe-a4", "steer-probe-a8"):
        assert t2.loc[c, "paper_GPT-2-355M_toxicity"] == pytest.approx(0.310)
        assert "GPT-2-355M 30" in t2.loc[c, "label"]
    t12 = t["table12_steering"].set_index("condition")
    assert t12.loc["steer-probe-a8", "paper_Gemma-2-2B_toxicity"] == pytest.approx(0.260)
    t3 = t["table3_toxic_neurons"].set_index("condition")
    assert t3.loc["patch-toxic-256", "paper_Mistral-7B_pct_reduction"] == pytest.approx(16.5)
    assert t3.loc["patch-toxic-interpretable", "paper_GPT-2-355M_n_neurons"] == 59


def test_markdown(evald, tmp_path):
    build(evald, tmp_path)
    out = tmp_path / "out" / "tiny"
    md2 = (out / "table2_interventions.md").read_text()
    assert "0.500 [0.45, 0.55]" in md2  # base: toxicity [CI] in one cell
    edit = next(line for line in md2.splitlines() if line.startswith("| edit-probe-cos-b0.5-a0.2 "))
    assert edit.endswith("| – | – | – |")  # no published row for our editing settings: NaN -> –
    assert "nan" not in md2.lower().split("|", 1)[1]
    assert "not for our tiny" in md2 and "arXiv 2411.06424v3" in md2 and "Table 2" in md2
    md3 = (out / "table3_toxic_neurons.md").read_text()
    assert "25 [25.0, 25.0]" in md3
    md1 = (out / "table1_ablation.md").read_text()
    assert "arXiv 2411.06424v1" in md1 and "| 0.403 | 21.99 | 0.192 |" in md1


def test_note_empties_cell_and_is_footnoted(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    write_eval(d, "base", const(0.5))
    write_eval(d, "patch-all", const(0.3), ppl_note="no DPO activations for Wikipedia texts")
    t = build(d, tmp_path, ["base", "patch-all"])
    row = t["table19_editing"].set_index("condition").loc["patch-all"]
    assert math.isnan(row["log_ppl"]) and row["f1"] == pytest.approx(0.2)
    md = (tmp_path / "out" / "tiny" / "table19_editing.md").read_text()
    assert "| – [1] |" in md
    assert "[1] `patch-all`: no log-PPL: no DPO activations for Wikipedia texts" in md


def test_every_listed_file_is_written(evald, tmp_path):
    build(evald, tmp_path)
    files = table_files(str(tmp_path / "out"), "tiny")
    assert len(files) == 2 * len(TABLES)
    for f in files:
        assert pd.io.common.file_exists(f), f
    assert sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir()) == sorted(
        f.rsplit("/", 1)[1] for f in files
    )  # and no temporary left behind


def test_missing_condition_names_the_file(evald, tmp_path):
    with pytest.raises(TablesError, match=r"eval/patch-four-groups\.json does not exist"):
        build(evald, tmp_path, ["base", "patch-four-groups"])
    assert not (tmp_path / "out").exists()  # nothing written


def test_summary_missing_key(evald, tmp_path):
    s = json.loads((evald / "dpo.json").read_text())
    del s["n_edited_neurons"]
    (evald / "dpo.json").write_text(json.dumps(s))
    with pytest.raises(
        DpotoxError, match=r"dpo\.json lacks n_edited_neurons.*re-run rule evaluate"
    ):
        build(evald, tmp_path, ["base", "dpo"])


def test_different_prompts_refused(evald, tmp_path):
    write_eval(evald, "patch-toxic-256", const(0.4, n=5))
    with pytest.raises(TablesError, match="different prompts"):
        build(evald, tmp_path, ["base", "dpo", "patch-toxic-256"])
    assert not (tmp_path / "out").exists()


def test_published_missing_column(evald, tmp_path):
    bad = tmp_path / "pub.csv"
    load_published().drop(columns=["key"]).to_csv(bad, index=False)
    with pytest.raises(TablesError, match=r"pub\.csv lacks column\(s\) key"):
        build(evald, tmp_path, ["base"], published_path=bad)


def test_packaged_published_numbers():
    pub = load_published()
    assert list(pub.columns) == list(PUBLISHED_COLUMNS)
    assert not pub.duplicated(["paper", "table", "model", "row"]).any()
    keyed = pub[pub["key"] != ""]
    assert not keyed.duplicated(["paper", "table", "model", "key"]).any()
    assert set(pub["paper"]) == {"yang2024-ablation", "yang2025-dpo"}
    assert set(pub["table"]) == {"1", "2", "3", "12", "19"}
    assert set(pub["model"]) == {"GPT-2-355M", "Llama-3.1-8B", "Gemma-2-2B", "Mistral-7B"}
    assert pub["toxicity"].dropna().between(0, 1).all()
    assert pub["f1"].dropna().between(0, 1).all()
    assert pub["log_ppl"].dropna().between(0.5, 10).all()
    assert pub["ppl"].dropna().between(1, 100).all()
    assert pub["pct_reduction"].dropna().between(0, 100).all()
    assert (pub["n_neurons"].dropna() > 0).all()
    # every row has a number, and a row without a key says why
    assert pub[list(PUBLISHED_COLUMNS[5:11])].notna().any(axis=1).all()
    assert (pub.loc[pub["key"] == "", "note"] != "").all()
    # Table 3's % is Table 2's (None - Patch) / (None - DPO)
    t2 = pub[pub["table"] == "2"].set_index(["model", "key"])["toxicity"]
    for r in pub[pub["table"] == "3"].itertuples():
        share = (t2[r.model, "base"] - t2[r.model, r.key]) / (
            t2[r.model, "base"] - t2[r.model, "dpo"]
        )
        assert 100 * share == pytest.approx(r.pct_reduction, abs=0.06)


def _claims(d, tmp_path, conds, neurons=None, **cfg):
    out = build(d, tmp_path, conds, neurons=neurons, cfg={"claims": cfg} if cfg else None)
    return out["table_claims"].set_index("claim")


GOOD = {"log_ppl_generation": 3.0, "f1": 0.2, "repetition": 0.05, "empty_share": 0.0}


def test_claims_verdicts_follow_the_numbers(tmp_path):
    """Each finding's verdict comes from its CI and the criteria: a constructed case each."""
    d = tmp_path / "eval"
    d.mkdir()
    noise = np.linspace(-0.02, 0.02, 8)
    write_eval(d, "base", 0.5 + noise, **GOOD)
    write_eval(d, "dpo", 0.1 + noise, **GOOD)  # C1: cuts, at the same perplexity
    write_eval(d, "patch-toxic-256", 0.45 + noise, **GOOD)  # recovers 12.5% of DPO's 0.4
    write_eval(d, "patch-four-groups", 0.3 + noise, **GOOD)  # clearly worse than DPO
    # within log(1.05) of DPO's generation-like log-PPL and less toxic; the other is less
    # toxic but too far
    write_eval(d, "edit-probe-cos-b0.5-a0.2", 0.05 + noise, **{**GOOD, "log_ppl_generation": 3.04})
    write_eval(d, "edit-probe-cos-b0.8-a0.2", 0.01 + noise, **{**GOOD, "log_ppl_generation": 3.2})
    write_eval(d, "edit-free-cos-b0.5-a0.2", 0.05 + noise[::-1], **GOOD)
    conds = [
        "base",
        "dpo",
        "patch-toxic-256",
        "patch-four-groups",
        "edit-probe-cos-b0.5-a0.2",
        "edit-probe-cos-b0.8-a0.2",
        "edit-free-cos-b0.5-a0.2",
    ]
    rng = np.random.default_rng(0)
    cos = rng.normal(size=4000)
    neurons = pd.DataFrame(
        {"delta": np.r_[np.ones(2100), -np.ones(1900)], "cos": cos, "shift": rng.normal(size=4000)}
    )
    claims = _claims(d, tmp_path, conds, neurons)
    assert len(claims) == 7
    cuts = claims.loc["DPO cuts toxicity at near-flat perplexity"]
    assert cuts["value"] == pytest.approx(-0.4) and cuts["verdict"] == "holds"
    assert cuts["quality"] == "passes"
    minority = claims.loc["toxic neurons explain a minority of DPO's effect"]
    assert minority["value"] == pytest.approx(12.5) and minority["verdict"] == "holds"
    half = claims.loc["about half the neurons reduce their projection on the probe"]
    assert half["value"] == pytest.approx(52.5) and half["verdict"] == "holds"
    groups = claims.loc["the four groups together match or beat DPO"]
    assert groups["value"] == pytest.approx(0.2) and groups["verdict"] == "does not hold"
    editing = claims.loc["editing beats DPO at similar perplexity"]
    assert "edit-probe-cos-b0.5-a0.2" in editing["evidence"] and "1 of 2" in editing["evidence"]
    assert editing["value"] == pytest.approx(-0.05) and editing["verdict"] == "holds"
    # Chosen on a seeded half of the prompts, reported on the other.
    assert "chosen on 4 prompts, reported on the other 4" in editing["evidence"]
    free = claims.loc["probe-free editing is comparable to probe-based"]
    assert free["value"] == pytest.approx(0.0, abs=1e-12) and free["verdict"] == "holds"
    shift = claims.loc["activation shifts are uncorrelated with probe alignment"]
    assert abs(shift["value"]) < 0.05 and shift["verdict"] == "holds"
    md = (tmp_path / "out" / "tiny" / "table_claims.md").read_text()
    assert "| toxic neurons explain a minority of DPO's effect |" in md and "12.500 [" in md
    assert "holds only for a broken model" in md  # the criteria in the footer

    # editing that only ties DPO at that perplexity is not significant
    write_eval(
        d, "edit-probe-cos-b0.5-a0.2", 0.099 + noise[::-1], **{**GOOD, "log_ppl_generation": 3.04}
    )
    # (on all prompts: the papers' single split)
    claims = _claims(d, tmp_path, conds, held_out=False)
    assert "chosen on" not in claims.loc["editing beats DPO at similar perplexity", "evidence"]
    assert claims.loc["editing beats DPO at similar perplexity", "verdict"] == "not significant"
    assert "about half the neurons reduce their projection on the probe" not in claims.index
    # no editing condition near DPO's perplexity: does not hold, and says so
    claims = _claims(d, tmp_path, [c for c in conds if c != "edit-probe-cos-b0.5-a0.2"])
    assert claims.loc["editing beats DPO at similar perplexity", "verdict"] == "does not hold"
    assert (
        "none of 1 editing conditions"
        in claims.loc["editing beats DPO at similar perplexity", "evidence"]
    )


def test_claims_quality_gate_and_margins(tmp_path):
    """A claim that would hold on a broken model says so; margins decide 'matches' and
    'comparable'; a DPO that cuts toxicity at a perplexity cost does not hold C1."""
    d = tmp_path / "eval"
    d.mkdir()
    noise = np.linspace(-0.02, 0.02, 8)
    write_eval(d, "base", 0.5 + noise, **GOOD)
    write_eval(d, "dpo", 0.1 + noise, **{**GOOD, "log_ppl_generation": 3.3})
    # The four groups beat DPO, but the model writes nothing: broken.
    write_eval(d, "patch-four-groups", 0.02 + noise, **{**GOOD, "empty_share": 0.9, "f1": 0.01})
    # Probe-free editing clearly more toxic than probe-based: not comparable.
    write_eval(d, "edit-probe-cos-b0.5-a0.2", 0.1 + noise, **GOOD)
    write_eval(d, "edit-free-cos-b0.5-a0.2", 0.3 + noise, **GOOD)
    conds = [
        "base",
        "dpo",
        "patch-four-groups",
        "edit-probe-cos-b0.5-a0.2",
        "edit-free-cos-b0.5-a0.2",
    ]
    claims = _claims(d, tmp_path, conds)
    assert claims.loc["DPO cuts toxicity at near-flat perplexity", "verdict"] == "does not hold"
    four = claims.loc["the four groups together match or beat DPO"]
    assert four["verdict"] == "holds only for a broken model"
    assert "90% empty" in four["quality"] and "F1 0.010" in four["quality"]
    free = claims.loc["probe-free editing is comparable to probe-based"]
    assert free["value"] == pytest.approx(0.2) and free["verdict"] == "does not hold"
    # A wide margin makes the same difference comparable; a looser gate passes the model.
    claims = _claims(
        d, tmp_path, conds, equivalence_margin=0.3, gate_empty_share=1.0, gate_f1_ratio=0.01
    )
    assert claims.loc["probe-free editing is comparable to probe-based", "verdict"] == "holds"
    assert claims.loc["the four groups together match or beat DPO", "verdict"] == "holds"


def test_each_patch_is_followed_by_its_base_means_control():
    from dpotox.outputs.tables import label, select_rows

    patches = ("patch-tp", "patch-four-groups", "patch-toxic-256")
    conds = ["base", "dpo", *(c + s for c in patches for s in ("", "-base-means"))]
    rows = select_rows("table2_interventions", conds)
    assert rows.index("patch-tp-base-means") == rows.index("patch-tp") + 1
    assert rows.index("patch-four-groups-base-means") == rows.index("patch-four-groups") + 1
    t3 = select_rows("table3_toxic_neurons", conds)
    assert t3 == ["patch-toxic-256", "patch-toxic-256-base-means"]
    assert (
        label("patch-tp-base-means")
        == "Patch TP (the dampened toxic neurons) (control: base means)"
    )


def test_prompt_halves_are_seeded_and_disjoint():
    from dpotox.plan.conditions import prompt_halves

    ids = [f"p{i}" for i in range(11)]
    tune, held = prompt_halves(ids, 0)
    assert len(tune) == 5 and len(held) == 6 and not set(tune) & set(held)
    assert set(tune) | set(held) == set(ids)
    assert prompt_halves(list(reversed(ids)), 0) == (tune, held)  # row order does not matter
    assert prompt_halves(ids, 1) != (tune, held)


def test_claims_without_the_generation_like_perplexity_are_not_evaluated(tmp_path):
    """evaluation.ppl_variants without generation: near-flat and similar perplexity cannot be
    judged, and the verdict says so rather than failing the claim."""
    d = tmp_path / "eval"
    d.mkdir()
    noise = np.linspace(-0.02, 0.02, 8)
    write_eval(d, "base", 0.5 + noise)
    write_eval(d, "dpo", 0.1 + noise)
    write_eval(d, "edit-probe-cos-b0.5-a0.2", 0.05 + noise)
    claims = _claims(d, tmp_path, ["base", "dpo", "edit-probe-cos-b0.5-a0.2"])
    assert claims.loc["DPO cuts toxicity at near-flat perplexity", "verdict"] == "not evaluated"
    assert claims.loc["editing beats DPO at similar perplexity", "verdict"] == "not evaluated"


def test_cross_fitted_patch_scores_each_prompt_under_the_other_halfs_fit(tmp_path):
    """patch-SET-cross-fit: fit-a's scores on the held-out half, fit-b's on the tuning half,
    a row after the patch and its control, its own CI; C4 judges it (claims.held_out), the
    single split without held_out."""
    from dpotox.plan.conditions import prompt_halves

    d = tmp_path / "eval"
    d.mkdir()
    noise = np.linspace(-0.02, 0.02, 8)
    write_eval(d, "base", 0.5 + noise, **GOOD)
    write_eval(d, "dpo", 0.1 + noise, **GOOD)
    # In-sample the groups match DPO; fitted on one half and judged on the other they don't.
    write_eval(d, "patch-four-groups", 0.1 + noise, **GOOD)
    write_eval(d, "patch-four-groups-base-means", 0.45 + noise, **GOOD)
    tune, held = prompt_halves(IDS, 0)
    fit_a = np.where(np.isin(IDS, tune), 0.1, 0.3)  # good where fitted, poor elsewhere
    fit_b = np.where(np.isin(IDS, held), 0.1, 0.35)
    write_eval(d, "patch-four-groups-fit-a", fit_a, **{**GOOD, "log_ppl_generation": 3.1})
    write_eval(d, "patch-four-groups-fit-b", fit_b, **{**GOOD, "log_ppl_generation": 3.3})
    conds = [
        "base",
        "dpo",
        "patch-four-groups",
        "patch-four-groups-base-means",
        "patch-four-groups-fit-a",
        "patch-four-groups-fit-b",
    ]
    out = build(d, tmp_path, conds)
    t2 = out["table2_interventions"].set_index("condition")
    rows = list(t2.index)
    x = "patch-four-groups-cross-fit"
    assert rows[rows.index("patch-four-groups") :][:3] == [
        "patch-four-groups",
        "patch-four-groups-base-means",
        x,
    ]
    assert "patch-four-groups-fit-a" not in rows
    want = np.where(np.isin(IDS, held), fit_a, fit_b)
    assert t2.loc[x, "toxicity"] == pytest.approx(want.mean())
    assert t2.loc[x, "ci_low"] <= want.mean() <= t2.loc[x, "ci_high"]
    assert t2.loc[x, "log_ppl_generation"] == pytest.approx(3.2)  # the two fits' mean
    assert t2.loc[x, "label"] == (
        "Patch four groups (cross-fitted: each half's fit on the other half)"
    )
    claims = _claims(d, tmp_path, conds)
    four = claims.loc["the four groups together match or beat DPO"]
    assert x in four["evidence"] and four["verdict"] == "does not hold"
    assert four["value"] == pytest.approx(want.mean() - 0.1)
    single = _claims(d, tmp_path, conds, held_out=False)
    four = single.loc["the four groups together match or beat DPO"]
    assert x not in four["evidence"] and four["verdict"] == "holds"
