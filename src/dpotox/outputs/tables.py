"""The papers' result tables for one of our models, with the papers' published numbers beside.

Table 1 of Yang, Sondej, Mayne, Mahdi (2024), "Ablation is not enough to emulate DPO" (NeurIPS
MINT workshop, arXiv 2411.06424v1; GPT-2 medium) and Tables 2, 3, 12 and 19 of Yang, Sondej,
Mayne, Lee, Mahdi (2025), "How does DPO reduce toxicity? A mechanistic neuron-level analysis"
(EMNLP 2025, arXiv 2411.06424v3; four models) are rebuilt from the outputs of rule ``evaluate``,
``{eval_dir}/{condition}.json`` (summary) and ``.parquet`` (per-prompt scores). A row exists only
for a condition that was evaluated. Beside it stand the published numbers of every paper model
whose published row carries the same condition key (``data/published.csv``, transcribed by
hand; ``data/published.md`` says from where). Those come from the papers' models and setups,
not ours: they show the direction and size of an effect, not digits to match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from dpotox.errors import TablesError
from dpotox.io import atomic_path
from dpotox.outputs.claims import ClaimsConfig, criteria, judge_claims
from dpotox.outputs.evals import load_summary, paired_bootstrap, paired_scores
from dpotox.plan.conditions import (
    PER_PROMPT,
    Ablation,
    Condition,
    Editing,
    KeyScaling,
    ModelRun,
    Patching,
    Steering,
    try_parse,
)
from dpotox.plan.outputs import RESULT_TABLES

__all__ = ["TablesError", "build_tables", "label", "load_published", "select_rows"]


SOURCES: dict[str, tuple[str, str] | None] = {
    "table1_ablation": ("yang2024-ablation", "1"),
    "table2_interventions": ("yang2025-dpo", "2"),
    "table3_toxic_neurons": ("yang2025-dpo", "3"),
    "table12_steering": ("yang2025-dpo", "12"),
    "table19_editing": ("yang2025-dpo", "19"),
    "table_per_prompt": None,
    "table_editing_grid": None,
    "table_claims": None,
}
CITATIONS = {
    "yang2024-ablation": "Yang, Sondej, Mayne, Mahdi (2024), Ablation is not enough to emulate "
    "DPO, NeurIPS MINT workshop (arXiv 2411.06424v1)",
    "yang2025-dpo": "Yang, Sondej, Mayne, Lee, Mahdi (2025), How does DPO reduce toxicity?, "
    "EMNLP 2025 (arXiv 2411.06424v3)",
}
PUBLISHED_COLUMNS = (
    "paper",
    "table",
    "model",
    "row",
    "key",
    "toxicity",
    "ppl",
    "log_ppl",
    "f1",
    "n_neurons",
    "pct_reduction",
    "note",
)
METRICS = ("toxicity", "ppl", "log_ppl", "f1", "n_neurons", "pct_reduction")
COLUMNS = [
    "condition",
    "label",
    "toxicity",
    "ci_low",
    "ci_high",
    # The same continuations under the pairs' scorer (dpo.pairs.scorer): DPO was trained
    # against it, not against the scorer of `toxicity`.
    "toxicity_pairs",
    "pairs_ci_low",
    "pairs_ci_high",
    "log_ppl",
    # The intervention placed as in generation, and as the reference code (position 0).
    "log_ppl_generation",
    "log_ppl_first",
    "f1",
    # Quality of the continuations (dpotox.engine.metrics.text_quality): low toxicity from a
    # model that writes nothing or repeats itself shows here.
    "distinct_1",
    "distinct_2",
    "repetition",
    "empty_share",
    "n",
    "n_neurons",
]

# A row of a table: one condition, or every condition of a kind (a grid, sorted by its numbers).
Row = Condition | Callable[[Condition], bool]


def _kind(cls: type[Condition], **fields: Any) -> Callable[[Condition], bool]:
    return lambda c: isinstance(c, cls) and all(getattr(c, k) == v for k, v in fields.items())


def _toxic_top(c: Condition) -> bool:
    return (
        isinstance(c, Patching)
        and not c.per_prompt
        and not c.base_means
        and c.fit is None
        and c.toxic_top is not None
    )


STEER = _kind(Steering)
EDIT_PROBE_COS = _kind(Editing, direction="probe", selection="cos", operation="scale")
EDIT_PROBE_ACT = _kind(Editing, direction="probe", selection="act", operation="scale")
EDIT_FREE_COS = _kind(Editing, direction="free", selection="cos", operation="scale")
EDIT_PROBE_REF = _kind(Editing, direction="probe", selection="ref", operation="scale")
# The reference notebook's operation: chosen neurons set to base mean x (1 -/+ alpha).
EDIT_CONST = _kind(Editing, operation="const")
BASE, DPO = ModelRun("base"), ModelRun("dpo")
PATCHES: list[Row] = [
    Patching("toxic-interpretable"),
    _toxic_top,
    *(Patching(s) for s in ("tp", "tp-an", "tp-an-tn", "four-groups", "all", "increased")),
]
# Row order as in the papers.
ROWS: dict[str, list[Row]] = {
    "table1_ablation": [
        BASE,
        _kind(Ablation, positive=False),
        _kind(Ablation, positive=True),
        Patching("tp"),
        DPO,
        _kind(KeyScaling),
    ],
    "table2_interventions": [BASE, STEER, DPO, *PATCHES[:6], EDIT_PROBE_COS, EDIT_FREE_COS],
    "table3_toxic_neurons": PATCHES[:2],
    "table12_steering": [BASE, STEER],
    "table19_editing": [
        BASE,
        STEER,
        DPO,
        *(Patching(s) for s in ("four-groups", "all", "increased")),
        EDIT_PROBE_COS,
        EDIT_PROBE_ACT,
        EDIT_PROBE_REF,
        EDIT_CONST,
    ],
    "table_per_prompt": PATCHES,
    "table_editing_grid": [
        BASE,
        DPO,
        STEER,
        EDIT_PROBE_COS,
        EDIT_PROBE_ACT,
        EDIT_FREE_COS,
        EDIT_PROBE_REF,
        EDIT_CONST,
    ],
    "table_claims": [
        BASE,
        DPO,
        _toxic_top,
        Patching("toxic-interpretable"),
        Patching("four-groups"),
        _kind(Patching, fit="cross"),
        _kind(Editing, direction="probe"),
        EDIT_FREE_COS,
    ],
}
_PATCH_LABELS = {
    "tp": "Patch TP (the dampened toxic neurons)",
    "tp-an": "Patch TP+AN",
    "tp-an-tn": "Patch TP+AN+TN",
    "four-groups": "Patch four groups",
    "all": "Patch all neurons",
    "increased": "Patch neurons whose toxicity projection rose",
    "toxic-interpretable": "Patch interpretable toxic neurons",
}
_EDIT_LABELS = {
    ("probe", "cos"): "probe, by |cos|",
    ("probe", "act"): "probe, by ascending |activation|",
    ("probe", "ref"): "probe, the reference's order",
    ("free", "cos"): "probe-free",
}


def label(condition: str) -> str:
    """A human-readable row label, worded like the paper's (the condition itself if unknown)."""
    match try_parse(condition):
        case ModelRun(model=m):
            return "None (base model)" if m == "base" else "DPO"
        case Patching(per_prompt=True) as c:
            return label(c.means.name) + " (per-prompt DPO activations)"
        case Patching(base_means=True) as c:
            return label(c.means.name) + " (control: base means)"
        case Patching(fit="cross") as c:
            return label(c.means.name) + " (cross-fitted: each half's fit on the other half)"
        case Patching(fit=half) as c if half is not None:
            return label(c.means.name) + f" (fitted on prompt half {half})"
        case Patching(neurons=s) as c:
            return (
                f"Patch top {c.toxic_top} toxic neurons"
                if c.toxic_top is not None
                else _PATCH_LABELS.get(s, condition)
            )
        case Steering(alpha=a):
            return f"Steering with probe, alpha={a:g}"
        case Ablation(n=n, positive=positive, generation_only=gen):
            what = f"Ablate top {n} {'positively activated ' if positive else ''}toxic neurons"
            return what + (" (generated positions only)" if gen else "")
        case KeyScaling(top=k, factor=f):
            return f"DPO, key vectors of the top {k} toxic neurons x{f:g}"
        case Editing(direction=d, selection=s, beta=b, alpha=a, operation=op) if (
            d,
            s,
        ) in _EDIT_LABELS:
            how = "set to base mean x 1-/+alpha, " if op == "const" else ""
            return f"Activation editing ({how}{_EDIT_LABELS[d, s]}) beta={b:g} alpha={a:g}"
    return condition


# Tables whose DPO-means patches are each followed by their base-means control.
CONTROLLED = ("table1_ablation", "table2_interventions", "table3_toxic_neurons", "table19_editing")


def _controls(condition: str) -> tuple[str, ...]:
    """The base-means control and the cross-fitted version of a plain DPO-means patch."""
    p = try_parse(condition)
    if isinstance(p, Patching) and not p.per_prompt and not p.base_means and p.fit is None:
        return (p.control.name, p.fitted("cross").name)
    return ()


def cross_fitted(conditions: Iterable[str]) -> list[str]:
    """The cross-fitted patches (``patch-SET-cross-fit``) whose two fits are among
    ``conditions``: the tables add them as rows."""
    conditions = set(conditions)
    out = []
    for c in conditions:
        p = try_parse(c)
        if isinstance(p, Patching) and p.fit == "a" and p.fitted("b").name in conditions:
            out.append(p.fitted("cross").name)
    return sorted(out)


def select_rows(name: str, conditions: Iterable[str]) -> list[str]:
    """The evaluated conditions that are rows of table ``name``, in the paper's order; Table 3
    puts each per-prompt twin right after its condition."""
    conditions = list(dict.fromkeys(conditions))
    parsed = [(c, p) for c in conditions if (p := try_parse(c)) is not None]
    rows: list[str] = []
    for row in ROWS[name]:
        if isinstance(row, Condition):
            rows += [row.name] if row.name in conditions else []
        else:
            rows += [
                c
                for c, p in sorted(
                    ((c, p) for c, p in parsed if row(p)), key=lambda h: h[1].numbers
                )
            ]
    if name in CONTROLLED:
        # Each patch with DPO means is followed by its control, the same set at base means,
        # and its cross-fitted version.
        rows = [r for c in rows for r in (c, *_controls(c)) if r in conditions]
    if name == "table3_toxic_neurons":
        rows = [r for c in rows for r in (c, c + PER_PROMPT) if r in conditions]
    if name == "table_per_prompt":
        rows = [c for c in rows if c + PER_PROMPT in conditions]
    return list(dict.fromkeys(rows))


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The papers' published numbers (the packaged ``data/published.csv`` by default)."""
    source = resources.files("dpotox") / "data" / "published.csv" if path is None else Path(path)
    try:
        # keep_default_na=False: a row labelled "None" is the paper's no-intervention row
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise TablesError(f"cannot read the published numbers {source}: {e}") from None
    if missing := [c for c in PUBLISHED_COLUMNS if c not in df.columns]:
        raise TablesError(
            f"{source} lacks column(s) {', '.join(missing)}; it needs "
            f"{', '.join(PUBLISHED_COLUMNS)}"
        )
    for col in METRICS:
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    return df


def _ours(s: dict[str, Any]) -> dict[str, Any]:
    """Our columns for one condition (no log-PPL/F1 where the summary says why there is none)."""
    return {
        "condition": s["condition"],
        "label": label(s["condition"]),
        "toxicity": s["toxicity"],
        "ci_low": s["toxicity_ci_low"],
        "ci_high": s["toxicity_ci_high"],
        **{
            col: math.nan if s.get(key) is None else float(s[key])
            for col, key in (
                ("toxicity_pairs", "pairs_toxicity"),
                ("pairs_ci_low", "pairs_toxicity_ci_low"),
                ("pairs_ci_high", "pairs_toxicity_ci_high"),
                *((q, q) for q in ("distinct_1", "distinct_2", "repetition", "empty_share")),
            )
        },
        **{
            k: math.nan if s.get(k) is None or s.get(note) else float(s[k])
            for k, note in (
                ("log_ppl", "ppl_note"),
                ("log_ppl_generation", "ppl_note"),
                ("log_ppl_first", "ppl_note"),
                ("f1", "f1_note"),
            )
        },
        "n": int(s["n_prompts"]),
        "n_neurons": int(s["n_edited_neurons"]),
    }


def _table3(
    rows: list[str], summ: dict[str, dict], eval_dir: Path, n_total: int, boot: dict
) -> pd.DataFrame:
    """Table 3 with the share of DPO's reduction each patch recovers, paired over prompts."""
    out = []
    for c in rows:
        r = _ours(summ[c])
        r["pct_of_mlp_neurons"] = 100 * r["n_neurons"] / n_total
        share = (math.nan,) * 3
        if "base" in summ and "dpo" in summ:
            share = paired_bootstrap(  # columns: base, c, dpo
                paired_scores(eval_dir, ["base", c, "dpo"]),
                lambda m: 100 * (m[..., 0] - m[..., 1]) / (m[..., 0] - m[..., 2]),
                **boot,
            )
        out.append(r | dict(zip(("recovered_pct", "recovered_ci_low", "recovered_ci_high"), share)))
    return pd.DataFrame(
        out,
        columns=[
            "condition",
            "label",
            "n_neurons",
            "pct_of_mlp_neurons",
            "toxicity",
            "ci_low",
            "ci_high",
            "recovered_pct",
            "recovered_ci_low",
            "recovered_ci_high",
            "n",
        ],
    )


def _per_prompt(rows: list[str], summ: dict[str, dict], eval_dir: Path, boot: dict) -> pd.DataFrame:
    """Each patch next to its per-prompt twin: the difference (twin minus means), paired."""
    out = []
    for c in rows:
        twin = c + PER_PROMPT
        diff = paired_bootstrap(
            paired_scores(eval_dir, [c, twin]), lambda m: m[..., 1] - m[..., 0], **boot
        )
        out.append(
            [
                c,
                twin,
                label(c),
                summ[c]["toxicity"],
                summ[twin]["toxicity"],
                *diff,
                int(summ[c]["n_prompts"]),
            ]
        )
    return pd.DataFrame(
        out,
        columns=[
            "condition",
            "twin",
            "label",
            "toxicity",
            "toxicity_per_prompt",
            "difference",
            "difference_ci_low",
            "difference_ci_high",
            "n",
        ],
    )


def _editing_grid(rows: list[str], summ: dict[str, dict]) -> pd.DataFrame:
    """Every editing condition with its method, beta and alpha as columns, beside the base
    model, DPO and steering (alpha only): the data of the editing trade-off figure. Editing
    rows also give the edit's projected reduction along the probe and DPO's net reduction
    (the neuron table's summed delta), from the spec: is the edit as strong as DPO's shift?"""
    out = []
    for c in rows:  # rows are base, dpo, steering and editing conditions (select_rows)
        method, beta, alpha = c, math.nan, math.nan
        match try_parse(c):
            case Steering(alpha=a):
                method, alpha = "steering", a
            case Editing() as e:
                method, beta, alpha = e.method, e.beta, e.alpha
        meta = summ[c].get("spec_meta") or {}
        out.append(
            _ours(summ[c])
            | {"method": method, "beta": beta, "alpha": alpha}
            | {k: float(meta.get(k, math.nan)) for k in PROJECTED}
        )
    return pd.DataFrame(out, columns=[*COLUMNS, "method", "beta", "alpha", *PROJECTED])


PROJECTED = ("projected_reduction", "dpo_net_reduction")


def attach_published(
    df: pd.DataFrame, published: pd.DataFrame, source: tuple[str, str]
) -> tuple[pd.DataFrame, list[str]]:
    """Add ``paper_{model}_{metric}`` columns from the published table ``source`` for every row
    whose condition is a published row's key; steering rows take the paper's selected alpha
    (named in the label; in Table 12, the alpha it selected for its Table 2). Returns the
    table and the notes of the published rows used."""
    pub = published[(published["paper"] == source[0]) & (published["table"] == source[1])]
    table2 = published[(published["paper"] == "yang2025-dpo") & (published["table"] == "2")]
    metrics = [m for m in METRICS if pub[m].notna().any()]
    df, notes, alphas = df.copy(), {}, {c: [] for c in df["condition"]}
    for model, mpub in pub.groupby("model", sort=False):
        keyed = mpub[mpub["key"] != ""].drop_duplicates("key").set_index("key")
        steer = [k for k in keyed.index if isinstance(try_parse(k), Steering)]
        if len(steer) > 1:
            steer = [k for k in steer if k in set(table2.loc[table2["model"] == model, "key"])]
        keys = [
            steer[0] if isinstance(try_parse(c), Steering) and len(steer) == 1 else c
            for c in df["condition"]
        ]
        hit = keyed.reindex(keys)
        for m in metrics:
            df[f"paper_{model}_{m}"] = hit[m].to_numpy(float)
        for c, k, note in zip(df["condition"], keys, hit["note"]):
            if isinstance(note, str) and note:
                notes.setdefault(f"`{k}`: {note}", []).append(model)
            if isinstance(s := try_parse(k), Steering) and k in keyed.index:
                alphas[c].append(f"{model} {s.alpha:g}")
    df["label"] = [
        lab + (f" (papers' alpha: {', '.join(alphas[c])})" if alphas[c] else "")
        for c, lab in zip(df["condition"], df["label"])
    ]
    return df, [f"{', '.join(models)} {note}" for note, models in notes.items()]


def _fmt(v: Any, col: str) -> str:
    """One markdown cell: ``–`` for a missing number; digits as the papers print them."""
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col == "n" or col.endswith("n_neurons"):
        return str(int(v))
    if col.endswith("ppl"):
        return f"{v:.2f}"
    return f"{v:.3g}" if "pct" in col else f"{v:.3f}"


CI_CELLS = (
    ("toxicity", "ci_low", "ci_high", 2),
    ("toxicity_pairs", "pairs_ci_low", "pairs_ci_high", 2),
    ("difference", "difference_ci_low", "difference_ci_high", 3),
    ("recovered_pct", "recovered_ci_low", "recovered_ci_high", 1),
    ("value", "ci_low", "ci_high", 3),
)


def render(
    df: pd.DataFrame, title: str, footer: list[str], marks: dict[tuple[int, str], int]
) -> str:
    """Markdown: an estimate and its CI in one cell (``0.301 [0.25, 0.35]``), ``–`` for none,
    ``– [k]`` where footnote k says why a cell is empty."""
    from dpotox.outputs.neuron_stats import (
        to_markdown,
    )  # here: that module loads torch, tables do not

    show = pd.DataFrame({c: [_fmt(v, c) for v in df[c]] for c in df.columns}, index=df.index)
    for col, lo, hi, d in CI_CELLS:
        if col in df and lo in df:
            show[col] = [
                s if math.isnan(a) else f"{s} [{a:.{d}f}, {b:.{d}f}]"
                for s, a, b in zip(show[col], df[lo], df[hi])
            ]
            show = show.drop(columns=[lo, hi])
    for (i, col), k in marks.items():
        show.loc[i, col] = f"– [{k}]"
    return f"# {title}\n\n{to_markdown(show)}\n" + "".join(f"{line}\n" for line in footer)


def _document(
    name: str,
    df: pd.DataFrame,
    summ: dict[str, dict],
    boot: dict,
    published: pd.DataFrame,
    model: str,
    claims_cfg: ClaimsConfig | None = None,
) -> tuple[pd.DataFrame, str]:
    """The table with the papers' columns, and its markdown with the footnotes."""
    footer = ["Toxicity: mean score of the continuations [bootstrap CI over prompts]; `–`: none."]
    if "repetition" in df:
        footer.append(
            "distinct_1, distinct_2: distinct word uni-/bigrams over all of them in the "
            "continuations; repetition: mean per-continuation bigram repetition (Yang et al. "
            "2025's code); empty_share: continuations without a word."
        )
    scorers = {(s.get("scorer"), s.get("pairs_scorer")) for s in summ.values()}
    if "toxicity_pairs" in df and any(pairs for _, pairs in scorers):
        main, pairs = sorted(scorers, key=str)[0]
        footer.append(
            f"toxicity: scored by {main}, which DPO's pairs were not chosen by; toxicity_pairs: "
            f"the same continuations scored by {pairs}, the scorer of DPO's pairs "
            "(dpo.pairs.scorer)."
        )
    marks: dict[tuple[int, str], int] = {}
    for i, c in enumerate(df["condition"] if "condition" in df else []):
        for col, key, what in (("log_ppl", "ppl_note", "log-PPL"), ("f1", "f1_note", "F1")):
            if col in df and summ[c].get(key):
                marks[(i, col)] = len(marks) + 1
                footer.append(f"[{len(marks)}] `{c}`: no {what}: {summ[c][key]}")
    if name == "table3_toxic_neurons":
        footer.append(
            f"recovered_pct = 100 (tox_base - tox_c) / (tox_base - tox_dpo) with a "
            f"paired percentile bootstrap over prompts ({boot.get('samples')} "
            f"resamples, seed {boot.get('seed')}); empty unless base and dpo are rows."
        )
    if name == "table_per_prompt":
        footer.append("difference = per-prompt minus mean patching, paired bootstrap CI.")
    if name == "table_claims":
        footer.append(criteria(claims_cfg or ClaimsConfig()))
    if source := SOURCES[name]:
        df, notes = attach_published(df, published, source)
        footer += [
            "",
            f"`paper_<model>_*`: the published numbers of "
            f"{CITATIONS.get(source[0], source[0])}, Table {source[1]}, transcribed by "
            f"hand (dpotox/data/published.csv). They are for the papers' models and "
            f"setups, not for our {model}; each stands beside the row of the same "
            "condition (steering rows: the paper's selected alpha).",
        ]
        if notes:
            footer += ["", "Notes on the published rows shown:", *(f"- {n}" for n in notes)]
    return df, render(df, f"{RESULT_TABLES[name]}: {model}", footer, marks)


def build_tables(
    eval_dir: str | Path,
    conditions: list[str],
    model: str,
    out_dir: str | Path,
    *,
    n_neurons_total: int,
    published_path: str | Path | None = None,
    neurons: pd.DataFrame | None = None,
    cfg: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Rule ``tables``: build every table of :data:`RESULT_TABLES` for ``model`` from the evaluated
    ``conditions`` and write each as CSV and markdown to ``out_dir``. All are computed before
    any file is written, so a bad input leaves no table half-updated. ``neurons`` (the neuron
    table) gives the claims about neurons (C3, C7); ``cfg`` its ``claims`` section."""
    claims_cfg = ClaimsConfig.from_config(cfg or {})
    if n_neurons_total <= 0:
        raise TablesError(
            f"n_neurons_total must be the model's number of MLP neurons, not {n_neurons_total}"
        )
    eval_dir, conditions = Path(eval_dir), list(dict.fromkeys(conditions))
    conditions += cross_fitted(conditions)
    summ = {c: load_summary(eval_dir, c) for c in conditions}
    published = load_published(published_path)
    s0 = summ.get("base") or next(iter(summ.values()), None)
    boot = (
        {
            "samples": int(s0["bootstrap_samples"]),
            "level": float(s0["ci_level"]),
            "seed": int(s0["settings"]["seed"]),
        }
        if s0
        else {}
    )
    tables, docs = {}, {}
    for name in RESULT_TABLES:
        rows = select_rows(name, conditions)
        if name == "table3_toxic_neurons":
            df = _table3(rows, summ, eval_dir, n_neurons_total, boot)
        elif name == "table_per_prompt":
            df = _per_prompt(rows, summ, eval_dir, boot)
        elif name == "table_editing_grid":
            df = _editing_grid(rows, summ)
        elif name == "table_claims":
            df = judge_claims(
                rows,
                summ,
                eval_dir,
                boot,
                tables["table3_toxic_neurons"],
                neurons,
                claims_cfg,
            )
        else:
            df = pd.DataFrame([_ours(summ[c]) for c in rows], columns=COLUMNS)
        tables[name], docs[name] = _document(name, df, summ, boot, published, model, claims_cfg)
    for name, df in tables.items():
        with atomic_path(Path(out_dir) / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(Path(out_dir) / f"{name}.md") as tmp:
            tmp.write_text(docs[name])
    return tables
