"""The papers' four findings, judged on one model's evaluated conditions (table_claims).

Each finding of Yang et al. 2025 (docs/papers.md) is a comparison of conditions on the same
prompts, judged by a paired bootstrap over prompts: ``holds`` when the whole interval is on
the claim's side, ``not significant`` when only the estimate is, else ``does not hold``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from dpotox.outputs.evals import paired_bootstrap, paired_scores
from dpotox.plan.conditions import Editing, ModelRun, Patching, try_parse

# "Similar perplexity" in the editing claim: a log-PPL at most this much above DPO's (5% PPL).
SIMILAR_LOG_PPL = math.log(1.05)
FOUR, DPO = Patching("four-groups").name, ModelRun("dpo").name
CLAIM_COLUMNS = ["claim", "paper", "evidence", "value", "ci_low", "ci_high", "verdict"]
CRITERIA = (
    "value [CI]: a paired bootstrap over prompts. Verdicts: `holds` (the whole CI is on "
    "the claim's side), `not significant` (the estimate is, the CI is not), `does not "
    "hold`. Criteria (dpotox.outputs.claims.judge_claims): recovered share below 50%; "
    "four groups minus DPO with a CI reaching 0 or below; the least toxic probe-based "
    "editing within log(1.05) of DPO's log-PPL, minus DPO, below 0; probe-free minus "
    "probe-based editing at each beta/alpha with a CI reaching 0 or below."
)


def _verdict(point: float, low: float, high: float, *, good_below: float) -> str:
    """``holds`` when the whole CI is on the claim's side of ``good_below``, ``not
    significant`` when only the estimate is, else ``does not hold``."""
    if math.isnan(point):
        return "not evaluated"
    if high < good_below:
        return "holds"
    return "not significant" if point < good_below else "does not hold"


def judge_claims(
    rows: list[str], summ: dict[str, dict], eval_dir: Path, boot: dict, table3: pd.DataFrame
) -> pd.DataFrame:
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
        return paired_bootstrap(
            paired_scores(eval_dir, [a, b]), lambda m: m[..., 0] - m[..., 1], **boot
        )

    out = []
    # 1: table 3's recovered shares of the patch-toxic-* rows (means, not per-prompt)
    t3 = table3[table3["condition"].isin(rows) & table3["recovered_pct"].notna()]
    if len(t3):
        r = t3.loc[t3["recovered_pct"].idxmax()]
        out.append(
            [
                "toxic neurons explain a minority of DPO's effect",
                "2.5-24% recovered",
                f"{r['condition']}: share of DPO's reduction recovered (%), the largest of "
                f"{len(t3)}",
                r["recovered_pct"],
                r["recovered_ci_low"],
                r["recovered_ci_high"],
                _verdict(
                    r["recovered_pct"], r["recovered_ci_low"], r["recovered_ci_high"], good_below=50
                ),
            ]
        )
    # 2
    if {FOUR, DPO} <= rows:
        d = diff(FOUR, DPO)
        verdict = (
            "not evaluated" if math.isnan(d[0]) else ("holds" if d[1] <= 0 else "does not hold")
        )
        ppl = {
            c: ("–" if summ[c]["log_ppl"] is None else f"{float(summ[c]['log_ppl']):.2f}")
            for c in (FOUR, DPO)
        }
        out.append(
            [
                "the four groups together match or beat DPO",
                "Table 2",
                f"toxicity, {FOUR} ({summ[FOUR]['toxicity']:.3f}, "
                f"log-PPL {ppl[FOUR]}) minus DPO ({summ[DPO]['toxicity']:.3f}, "
                f"log-PPL {ppl[DPO]})",
                *d,
                verdict,
            ]
        )
    # 3
    if DPO in rows and summ[DPO]["log_ppl"] is not None:
        limit = float(summ[DPO]["log_ppl"]) + SIMILAR_LOG_PPL
        edits = [c for c in rows if _editing(c, "probe")]
        similar = [
            c
            for c in edits
            if summ[c]["log_ppl"] is not None and float(summ[c]["log_ppl"]) <= limit
        ]
        if similar:
            best = min(similar, key=lambda c: summ[c]["toxicity"])
            d = diff(best, DPO)
            evidence = (
                f"toxicity, {best} (log-PPL {float(summ[best]['log_ppl']):.3f}) minus DPO "
                f"(log-PPL {float(summ[DPO]['log_ppl']):.3f}); the least toxic of "
                f"{len(similar)} of {len(edits)} editing conditions within log(1.05)"
            )
            out.append(
                [
                    "editing beats DPO at similar perplexity",
                    "Tables 2, 19",
                    evidence,
                    *d,
                    _verdict(*d, good_below=0),
                ]
            )
        elif edits:
            out.append(
                [
                    "editing beats DPO at similar perplexity",
                    "Tables 2, 19",
                    f"none of {len(edits)} editing conditions has a log-PPL within log(1.05) "
                    f"of DPO's ({float(summ[DPO]['log_ppl']):.3f})",
                    math.nan,
                    math.nan,
                    math.nan,
                    "does not hold",
                ]
            )
    # 4
    pairs = [
        (c, twin)
        for c in sorted(rows)
        if (e := _editing(c, "free", "cos"))
        and (twin := Editing("probe", "cos", e.beta, e.alpha).name) in rows
    ]
    if pairs:
        diffs = {free: diff(free, probe) for free, probe in pairs}
        worst = max(diffs, key=lambda c: diffs[c][0])
        d = diffs[worst]
        verdict = "holds" if all(v[1] <= 0 for v in diffs.values()) else "does not hold"
        out.append(
            [
                "probe-free editing is comparable to probe-based",
                "Table 2",
                f"toxicity, {worst} minus its probe-based twin; the largest of {len(pairs)} "
                "beta/alpha pairs",
                *d,
                verdict,
            ]
        )
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


def _editing(name: str, direction: str, selection: str | None = None) -> Editing | None:
    """``name`` parsed, if it is an editing condition with this direction (and selection)."""
    c = try_parse(name)
    if isinstance(c, Editing) and c.direction == direction and selection in (None, c.selection):
        return c
    return None
