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

import json
import math
import re
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dpotox.errors import DpotoxError
from dpotox.io import atomic_path


class TablesError(DpotoxError, ValueError):
    """Evaluation outputs or a published-numbers file that the tables cannot be built from."""


TABLES: dict[str, str] = {
    "table1_ablation": "Ablating and patching toxic neurons (Yang et al. 2024, Table 1)",
    "table2_interventions": "Steering, DPO, patching and editing (Yang et al. 2025, Table 2)",
    "table3_toxic_neurons": "Toxic neurons and the share of DPO's reduction that patching them "
                            "recovers (Yang et al. 2025, Table 3)",
    "table12_steering": "Steering with the probe at each alpha (Yang et al. 2025, Table 12)",
    "table19_editing": "Editing variants, patching checks (Yang et al. 2025, Table 19)",
    "table_per_prompt": "Patching with each prompt's own DPO activations vs the DPO means",
    "table_editing_grid": "Activation editing over the beta x alpha grid, with the base model, "
                          "DPO and steering as reference points",
    "table_claims": "The papers' findings, tested on this model",
}
# table -> (paper, published table) whose numbers stand beside our rows
SOURCES: dict[str, tuple[str, str] | None] = {
    "table1_ablation": ("yang2024-ablation", "1"), "table2_interventions": ("yang2025-dpo", "2"),
    "table3_toxic_neurons": ("yang2025-dpo", "3"), "table12_steering": ("yang2025-dpo", "12"),
    "table19_editing": ("yang2025-dpo", "19"), "table_per_prompt": None,
    "table_editing_grid": None, "table_claims": None,
}
CITATIONS = {
    "yang2024-ablation": "Yang, Sondej, Mayne, Mahdi (2024), Ablation is not enough to emulate "
                         "DPO, NeurIPS MINT workshop (arXiv 2411.06424v1)",
    "yang2025-dpo": "Yang, Sondej, Mayne, Lee, Mahdi (2025), How does DPO reduce toxicity?, "
                    "EMNLP 2025 (arXiv 2411.06424v3)",
}
PUBLISHED_COLUMNS = ("paper", "table", "model", "row", "key", "toxicity", "ppl", "log_ppl", "f1",
                     "n_neurons", "pct_reduction", "note")
METRICS = ("toxicity", "ppl", "log_ppl", "f1", "n_neurons", "pct_reduction")
SUMMARY_KEYS = ("condition", "toxicity", "toxicity_ci_low", "toxicity_ci_high", "ci_level",
                "log_ppl", "f1", "n_prompts", "n_edited_neurons", "bootstrap_samples", "settings")
PER_PROMPT = "-per-prompt"
COLUMNS = ["condition", "label", "toxicity", "ci_low", "ci_high", "log_ppl", "f1", "n", "n_neurons"]

N = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"  # a number as f"{x:g}" writes it
STEER = rf"steer-probe-a{N}"
PATCHES = ["patch-toxic-interpretable", rf"patch-toxic-{N}", "patch-tp", "patch-tp-an",
           "patch-tp-an-tn", "patch-four-groups", "patch-all", "patch-increased"]
# Row order as in the papers; a pattern stands for a grid, sorted by its numbers.
ROWS: dict[str, list[str]] = {
    "table1_ablation": ["base", rf"ablate-toxic-{N}", rf"ablate-toxic-pos-{N}", "patch-tp", "dpo",
                        rf"dpo-scale-keys-top{N}-x{N}"],
    "table2_interventions": ["base", STEER, "dpo", *PATCHES[:6], rf"edit-probe-cos-b{N}-a{N}",
                             rf"edit-free-cos-b{N}-a{N}"],
    "table3_toxic_neurons": PATCHES[:2],
    "table12_steering": ["base", STEER],
    "table19_editing": ["base", STEER, "dpo", "patch-four-groups", "patch-all", "patch-increased",
                        rf"edit-probe-cos-b{N}-a{N}", rf"edit-probe-act-b{N}-a{N}"],
    "table_per_prompt": PATCHES,
    "table_editing_grid": ["base", "dpo", STEER, rf"edit-probe-cos-b{N}-a{N}",
                           rf"edit-probe-act-b{N}-a{N}", rf"edit-free-cos-b{N}-a{N}"],
    "table_claims": ["base", "dpo", rf"patch-toxic-{N}", "patch-toxic-interpretable",
                     "patch-four-groups", rf"edit-probe-(?:cos|act)-b{N}-a{N}",
                     rf"edit-free-cos-b{N}-a{N}"],
}
# "Similar perplexity" in the editing claim: a log-PPL at most this much above DPO's (5% PPL).
SIMILAR_LOG_PPL = math.log(1.05)
CLAIM_COLUMNS = ["claim", "paper", "evidence", "value", "ci_low", "ci_high", "verdict"]
EDIT = "Activation editing ({}) beta={{0}} alpha={{1}}"
LABELS: list[tuple[str, str]] = [
    ("base", "None (base model)"), ("dpo", "DPO"),
    ("patch-tp", "Patch TP (the dampened toxic neurons)"),
    ("patch-tp-an", "Patch TP+AN"), ("patch-tp-an-tn", "Patch TP+AN+TN"),
    ("patch-four-groups", "Patch four groups"), ("patch-all", "Patch all neurons"),
    ("patch-increased", "Patch neurons whose toxicity projection rose"),
    ("patch-toxic-interpretable", "Patch interpretable toxic neurons"),
    (rf"patch-toxic-{N}", "Patch top {0} toxic neurons"), (STEER, "Steering with probe, alpha={0}"),
    (rf"ablate-toxic-{N}", "Ablate top {0} toxic neurons"),
    (rf"ablate-toxic-pos-{N}", "Ablate top {0} positively activated toxic neurons"),
    (rf"dpo-scale-keys-top{N}-x{N}", "DPO, key vectors of the top {0} toxic neurons x{1}"),
    (rf"edit-probe-cos-b{N}-a{N}", EDIT.format("probe, by |cos|")),
    (rf"edit-probe-act-b{N}-a{N}", EDIT.format("probe, by ascending |activation|")),
    (rf"edit-free-cos-b{N}-a{N}", EDIT.format("probe-free")),
]


def table_files(root: str, model: str) -> list[str]:
    """Every file rule ``tables`` writes for ``model`` under ``root``: CSV and markdown."""
    return [f"{root}/{model}/{name}.{ext}" for name in TABLES for ext in ("csv", "md")]


def label(condition: str) -> str:
    """A human-readable row label, worded like the paper's (the condition itself if unknown)."""
    base = condition.removesuffix(PER_PROMPT)
    suffix = " (per-prompt DPO activations)" if base != condition else ""
    for pattern, text in LABELS:
        if m := re.fullmatch(pattern, base):
            return text.format(*m.groups()) + suffix
    return condition


def select_rows(name: str, conditions: Iterable[str]) -> list[str]:
    """The evaluated conditions that are rows of table ``name``, in the paper's order; Table 3
    puts each per-prompt twin right after its condition."""
    conditions = list(dict.fromkeys(conditions))
    rows: list[str] = []
    for pattern in ROWS[name]:
        hits = [(m, c) for c in conditions if (m := re.fullmatch(pattern, c))]
        rows += [c for _, c in sorted(hits, key=lambda h: tuple(map(float, h[0].groups())))]
    if name == "table3_toxic_neurons":
        rows = [r for c in rows for r in (c, c + PER_PROMPT) if r in conditions]
    if name == "table_per_prompt":
        rows = [c for c in rows if c + PER_PROMPT in conditions]
    return list(dict.fromkeys(rows))


def load_summary(eval_dir: str | Path, condition: str) -> dict[str, Any]:
    """The summary JSON of one condition, checked for every key the tables read."""
    path = Path(eval_dir) / f"{condition}.json"
    if not path.is_file():
        raise TablesError(f"{path} does not exist: condition {condition!r} is listed but was not "
                          "evaluated; run rule evaluate for it, or drop it from the conditions")
    try:
        s = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TablesError(f"{path} is not valid JSON ({e}); re-run rule evaluate") from None
    missing = [k for k in SUMMARY_KEYS if k not in s]
    if "seed" not in (s.get("settings") or {}):
        missing.append("settings.seed")
    if missing:
        raise TablesError(f"{path} lacks {', '.join(dict.fromkeys(missing))}: it was written by "
                          f"an older dpotox; re-run rule evaluate for {condition!r}")
    if s["condition"] != condition:
        raise TablesError(f"{path} holds condition {s['condition']!r}, not {condition!r}; "
                          "re-run rule evaluate for it")
    return s


def _scores(eval_dir: Path, condition: str) -> pd.Series:
    """Per-prompt toxicity scores of one condition, indexed by prompt id."""
    path = eval_dir / f"{condition}.parquet"
    if not path.is_file():
        raise TablesError(f"{path} does not exist: the paired bootstrap needs the per-prompt "
                          f"scores; re-run rule evaluate for {condition!r}")
    if missing := {"id", "score"} - set(pq.read_schema(path).names):
        raise TablesError(f"{path} lacks column(s) {', '.join(sorted(missing))}; "
                          "re-run rule evaluate")
    df = pd.read_parquet(path, columns=["id", "score"])
    if df["id"].duplicated().any():
        raise TablesError(f"{path} lists a prompt id twice; re-run rule evaluate for {condition!r}")
    return pd.Series(df["score"].to_numpy(float), index=df["id"].astype(str), name=condition)


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The papers' published numbers (the packaged ``data/published.csv`` by default)."""
    source = resources.files("dpotox") / "data" / "published.csv" if path is None else Path(path)
    try:
        # keep_default_na=False: a row labelled "None" is the paper's no-intervention row
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise TablesError(f"cannot read the published numbers {source}: {e}") from None
    if missing := [c for c in PUBLISHED_COLUMNS if c not in df.columns]:
        raise TablesError(f"{source} lacks column(s) {', '.join(missing)}; it needs "
                          f"{', '.join(PUBLISHED_COLUMNS)}")
    for col in METRICS:
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    return df


def paired_bootstrap(columns: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], *,
                     samples: int, level: float, seed: int) -> tuple[float, float, float]:
    """``stat`` of the column means of an (n prompts, k) array, with a percentile interval from
    resampling whole rows (prompts), so that the k conditions stay paired. Resamples where the
    statistic is undefined (a zero denominator) are left out."""
    point = float(stat(columns.mean(axis=0)))
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, samples, 256):
        idx = rng.integers(0, len(columns), size=(min(256, samples - start), len(columns)))
        with np.errstate(divide="ignore", invalid="ignore"):
            draws.append(stat(columns[idx].mean(axis=1)))
    draws = np.concatenate(draws)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return point, math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return point, float(low), float(high)


def _paired(eval_dir: Path, conditions: list[str]) -> np.ndarray:
    """Per-prompt scores of ``conditions`` as columns, rows aligned by prompt id."""
    series = [_scores(eval_dir, c) for c in conditions]
    for s in series[1:]:
        if set(s.index) != set(series[0].index):
            raise TablesError(f"{eval_dir}: {series[0].name}.parquet and {s.name}.parquet hold "
                              f"different prompts ({len(series[0])} vs {len(s)}); evaluate both "
                              "on the same prompts")
    return np.column_stack([s.reindex(series[0].index).to_numpy() for s in series])


def _ours(s: dict[str, Any]) -> dict[str, Any]:
    """Our columns for one condition (no log-PPL/F1 where the summary says why there is none)."""
    return {"condition": s["condition"], "label": label(s["condition"]), "toxicity": s["toxicity"],
            "ci_low": s["toxicity_ci_low"], "ci_high": s["toxicity_ci_high"],
            **{k: math.nan if s[k] is None or s.get(note) else float(s[k])
               for k, note in (("log_ppl", "ppl_note"), ("f1", "f1_note"))},
            "n": int(s["n_prompts"]), "n_neurons": int(s["n_edited_neurons"])}


def _table3(rows: list[str], summ: dict[str, dict], eval_dir: Path, n_total: int,
            boot: dict) -> pd.DataFrame:
    """Table 3 with the share of DPO's reduction each patch recovers, paired over prompts."""
    out = []
    for c in rows:
        r = _ours(summ[c])
        r["pct_of_mlp_neurons"] = 100 * r["n_neurons"] / n_total
        share = (math.nan,) * 3
        if "base" in summ and "dpo" in summ:
            share = paired_bootstrap(  # columns: base, c, dpo
                _paired(eval_dir, ["base", c, "dpo"]),
                lambda m: 100 * (m[..., 0] - m[..., 1]) / (m[..., 0] - m[..., 2]), **boot)
        out.append(r | dict(zip(("recovered_pct", "recovered_ci_low", "recovered_ci_high"), share)))
    return pd.DataFrame(out, columns=["condition", "label", "n_neurons", "pct_of_mlp_neurons",
                                      "toxicity", "ci_low", "ci_high", "recovered_pct",
                                      "recovered_ci_low", "recovered_ci_high", "n"])


def _per_prompt(rows: list[str], summ: dict[str, dict], eval_dir: Path,
                boot: dict) -> pd.DataFrame:
    """Each patch next to its per-prompt twin: the difference (twin minus means), paired."""
    out = []
    for c in rows:
        twin = c + PER_PROMPT
        diff = paired_bootstrap(_paired(eval_dir, [c, twin]), lambda m: m[..., 1] - m[..., 0],
                                **boot)
        out.append([c, twin, label(c), summ[c]["toxicity"], summ[twin]["toxicity"], *diff,
                    int(summ[c]["n_prompts"])])
    return pd.DataFrame(out, columns=["condition", "twin", "label", "toxicity",
                                      "toxicity_per_prompt", "difference", "difference_ci_low",
                                      "difference_ci_high", "n"])


def _editing_grid(rows: list[str], summ: dict[str, dict]) -> pd.DataFrame:
    """Every editing condition with its method, beta and alpha as columns, beside the base
    model, DPO and steering (alpha only): the data of the editing trade-off figure."""
    out = []
    for c in rows:  # rows are base, dpo, steering and editing conditions (select_rows)
        method, beta, alpha = c, math.nan, math.nan
        if m := re.fullmatch(STEER, c):
            method, alpha = "steering", float(m[1])
        elif m := re.fullmatch(rf"(edit-[a-z]+-[a-z]+)-b{N}-a{N}", c):
            method, beta, alpha = m[1], float(m[2]), float(m[3])
        out.append(_ours(summ[c]) | {"method": method, "beta": beta, "alpha": alpha})
    return pd.DataFrame(out, columns=[*COLUMNS, "method", "beta", "alpha"])


def _verdict(point: float, low: float, high: float, *, good_below: float) -> str:
    """``holds`` when the whole CI is on the claim's side of ``good_below``, ``not
    significant`` when only the estimate is, else ``does not hold``."""
    if math.isnan(point):
        return "not evaluated"
    if high < good_below:
        return "holds"
    return "not significant" if point < good_below else "does not hold"


def _claims(rows: list[str], summ: dict[str, dict], eval_dir: Path, boot: dict,
            table3: pd.DataFrame) -> pd.DataFrame:
    """The four findings of Yang et al. (2025), each judged on this model's conditions with a
    paired bootstrap over prompts (the CI of ``value``):

    1. toxic neurons explain a minority of DPO's effect: the largest share of DPO's toxicity
       reduction that patching toxic neurons (by their DPO means) recovers is below 50%;
    2. the four groups together match or beat DPO: patching all four groups is not more toxic
       than DPO (toxicity difference, four groups minus DPO: its CI reaches 0 or below);
    3. editing beats DPO at similar perplexity: the least toxic probe-based editing condition
       whose log-PPL is at most log(1.05) above DPO's is less toxic (difference, edit minus DPO);
    4. probe-free editing is comparable to probe-based: at every beta and alpha both were run at
       (by |cos|), probe-free is not more toxic (the largest difference, free minus probe, has
       a CI reaching 0 or below).
    """
    rows = set(rows)

    def diff(a: str, b: str) -> tuple[float, float, float]:
        return paired_bootstrap(_paired(eval_dir, [a, b]), lambda m: m[..., 0] - m[..., 1], **boot)

    out = []
    # 1: table 3's recovered shares of the patch-toxic-* rows (means, not per-prompt)
    t3 = table3[table3["condition"].isin(rows) & table3["recovered_pct"].notna()]
    if len(t3):
        r = t3.loc[t3["recovered_pct"].idxmax()]
        out.append(["toxic neurons explain a minority of DPO's effect", "2.5-24% recovered",
                    f"{r['condition']}: share of DPO's reduction recovered (%), the largest of "
                    f"{len(t3)}", r["recovered_pct"], r["recovered_ci_low"], r["recovered_ci_high"],
                    _verdict(r["recovered_pct"], r["recovered_ci_low"], r["recovered_ci_high"],
                             good_below=50)])
    # 2
    if {"patch-four-groups", "dpo"} <= rows:
        d = diff("patch-four-groups", "dpo")
        verdict = "not evaluated" if math.isnan(d[0]) else (
            "holds" if d[1] <= 0 else "does not hold")
        ppl = {c: ("–" if summ[c]["log_ppl"] is None else f"{float(summ[c]['log_ppl']):.2f}")
               for c in ("patch-four-groups", "dpo")}
        out.append(["the four groups together match or beat DPO", "Table 2",
                    f"toxicity, patch-four-groups ({summ['patch-four-groups']['toxicity']:.3f}, "
                    f"log-PPL {ppl['patch-four-groups']}) minus DPO ({summ['dpo']['toxicity']:.3f}, "
                    f"log-PPL {ppl['dpo']})", *d, verdict])
    # 3
    if "dpo" in rows and summ["dpo"]["log_ppl"] is not None:
        limit = float(summ["dpo"]["log_ppl"]) + SIMILAR_LOG_PPL
        edits = [c for c in rows if c.startswith("edit-probe-")]
        similar = [c for c in edits if summ[c]["log_ppl"] is not None
                   and float(summ[c]["log_ppl"]) <= limit]
        if similar:
            best = min(similar, key=lambda c: summ[c]["toxicity"])
            d = diff(best, "dpo")
            evidence = (f"toxicity, {best} (log-PPL {float(summ[best]['log_ppl']):.3f}) minus DPO "
                        f"(log-PPL {float(summ['dpo']['log_ppl']):.3f}); the least toxic of "
                        f"{len(similar)} of {len(edits)} editing conditions within log(1.05)")
            out.append(["editing beats DPO at similar perplexity", "Tables 2, 19", evidence, *d,
                        _verdict(*d, good_below=0)])
        elif edits:
            out.append(["editing beats DPO at similar perplexity", "Tables 2, 19",
                        f"none of {len(edits)} editing conditions has a log-PPL within log(1.05) "
                        f"of DPO's ({float(summ['dpo']['log_ppl']):.3f})", math.nan, math.nan,
                        math.nan, "does not hold"])
    # 4
    pairs = [(c, c.replace("edit-free-", "edit-probe-")) for c in sorted(rows)
             if c.startswith("edit-free-cos-") and c.replace("edit-free-", "edit-probe-") in rows]
    if pairs:
        diffs = {free: diff(free, probe) for free, probe in pairs}
        worst = max(diffs, key=lambda c: diffs[c][0])
        d = diffs[worst]
        verdict = "holds" if all(v[1] <= 0 for v in diffs.values()) else "does not hold"
        out.append(["probe-free editing is comparable to probe-based", "Table 2",
                    f"toxicity, {worst} minus its probe-based twin; the largest of {len(pairs)} "
                    "beta/alpha pairs", *d, verdict])
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


def attach_published(df: pd.DataFrame, published: pd.DataFrame,
                     source: tuple[str, str]) -> tuple[pd.DataFrame, list[str]]:
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
        steer = [k for k in keyed.index if k.startswith("steer-probe-")]
        if len(steer) > 1:
            steer = [k for k in steer if k in set(table2.loc[table2["model"] == model, "key"])]
        keys = [steer[0] if c.startswith("steer-probe-") and len(steer) == 1 else c
                for c in df["condition"]]
        hit = keyed.reindex(keys)
        for m in metrics:
            df[f"paper_{model}_{m}"] = hit[m].to_numpy(float)
        for c, k, note in zip(df["condition"], keys, hit["note"]):
            if isinstance(note, str) and note:
                notes.setdefault(f"`{k}`: {note}", []).append(model)
            if c.startswith("steer-probe-") and k in keyed.index:
                alphas[c].append(f"{model} {k.removeprefix('steer-probe-a')}")
    df["label"] = [lab + (f" (papers' alpha: {', '.join(alphas[c])})" if alphas[c] else "")
                   for c, lab in zip(df["condition"], df["label"])]
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


CI_CELLS = (("toxicity", "ci_low", "ci_high", 2), ("difference", "difference_ci_low",
            "difference_ci_high", 3), ("recovered_pct", "recovered_ci_low", "recovered_ci_high", 1),
            ("value", "ci_low", "ci_high", 3))


def render(df: pd.DataFrame, title: str, footer: list[str],
           marks: dict[tuple[int, str], int]) -> str:
    """Markdown: an estimate and its CI in one cell (``0.301 [0.25, 0.35]``), ``–`` for none,
    ``– [k]`` where footnote k says why a cell is empty."""
    from dpotox.neuron_stats import to_markdown  # here: that module loads torch, tables do not

    show = pd.DataFrame({c: [_fmt(v, c) for v in df[c]] for c in df.columns}, index=df.index)
    for col, lo, hi, d in CI_CELLS:
        if col in df and lo in df:
            show[col] = [s if math.isnan(a) else f"{s} [{a:.{d}f}, {b:.{d}f}]"
                         for s, a, b in zip(show[col], df[lo], df[hi])]
            show = show.drop(columns=[lo, hi])
    for (i, col), k in marks.items():
        show.loc[i, col] = f"– [{k}]"
    return f"# {title}\n\n{to_markdown(show)}\n" + "".join(f"{line}\n" for line in footer)


def _document(name: str, df: pd.DataFrame, summ: dict[str, dict], boot: dict,
              published: pd.DataFrame, model: str) -> tuple[pd.DataFrame, str]:
    """The table with the papers' columns, and its markdown with the footnotes."""
    footer = ["Toxicity: mean score of the continuations [bootstrap CI over prompts]; `–`: none."]
    marks: dict[tuple[int, str], int] = {}
    for i, c in enumerate(df["condition"] if "condition" in df else []):
        for col, key, what in (("log_ppl", "ppl_note", "log-PPL"), ("f1", "f1_note", "F1")):
            if col in df and summ[c].get(key):
                marks[(i, col)] = len(marks) + 1
                footer.append(f"[{len(marks)}] `{c}`: no {what}: {summ[c][key]}")
    if name == "table3_toxic_neurons":
        footer.append(f"recovered_pct = 100 (tox_base - tox_c) / (tox_base - tox_dpo) with a "
                      f"paired percentile bootstrap over prompts ({boot.get('samples')} "
                      f"resamples, seed {boot.get('seed')}); empty unless base and dpo are rows.")
    if name == "table_per_prompt":
        footer.append("difference = per-prompt minus mean patching, paired bootstrap CI.")
    if name == "table_claims":
        footer.append(
            "value [CI]: a paired bootstrap over prompts. Verdicts: `holds` (the whole CI is on "
            "the claim's side), `not significant` (the estimate is, the CI is not), `does not "
            "hold`. Criteria (dpotox.tables._claims): recovered share below 50%; four groups "
            "minus DPO with a CI reaching 0 or below; the least toxic probe-based editing "
            "within log(1.05) of DPO's log-PPL, minus DPO, below 0; probe-free minus "
            "probe-based editing at each beta/alpha with a CI reaching 0 or below.")
    if source := SOURCES[name]:
        df, notes = attach_published(df, published, source)
        footer += ["", f"`paper_<model>_*`: the published numbers of "
                   f"{CITATIONS.get(source[0], source[0])}, Table {source[1]}, transcribed by "
                   f"hand (dpotox/data/published.csv). They are for the papers' models and "
                   f"setups, not for our {model}; each stands beside the row of the same "
                   "condition (steering rows: the paper's selected alpha)."]
        if notes:
            footer += ["", "Notes on the published rows shown:", *(f"- {n}" for n in notes)]
    return df, render(df, f"{TABLES[name]}: {model}", footer, marks)


def build_tables(eval_dir: str | Path, conditions: list[str], model: str, out_dir: str | Path, *,
                 n_neurons_total: int,
                 published_path: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Rule ``tables``: build every table of :data:`TABLES` for ``model`` from the evaluated
    ``conditions`` and write each as CSV and markdown to ``out_dir``. All are computed before
    any file is written, so a bad input leaves no table half-updated."""
    if n_neurons_total <= 0:
        raise TablesError(f"n_neurons_total must be the model's number of MLP neurons, "
                          f"not {n_neurons_total}")
    eval_dir, conditions = Path(eval_dir), list(dict.fromkeys(conditions))
    summ = {c: load_summary(eval_dir, c) for c in conditions}
    published = load_published(published_path)
    s0 = summ.get("base") or next(iter(summ.values()), None)
    boot = {"samples": int(s0["bootstrap_samples"]), "level": float(s0["ci_level"]),
            "seed": int(s0["settings"]["seed"])} if s0 else {}
    tables, docs = {}, {}
    for name in TABLES:
        rows = select_rows(name, conditions)
        if name == "table3_toxic_neurons":
            df = _table3(rows, summ, eval_dir, n_neurons_total, boot)
        elif name == "table_per_prompt":
            df = _per_prompt(rows, summ, eval_dir, boot)
        elif name == "table_editing_grid":
            df = _editing_grid(rows, summ)
        elif name == "table_claims":
            df = _claims(rows, summ, eval_dir, boot, tables["table3_toxic_neurons"])
        else:
            df = pd.DataFrame([_ours(summ[c]) for c in rows], columns=COLUMNS)
        tables[name], docs[name] = _document(name, df, summ, boot, published, model)
    for name, df in tables.items():
        with atomic_path(Path(out_dir) / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(Path(out_dir) / f"{name}.md") as tmp:
            tmp.write_text(docs[name])
    return tables
