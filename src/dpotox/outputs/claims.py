"""The papers' seven findings, judged on one model's evaluated conditions (table_claims).

Each finding (docs/papers.md; C1-C7 below) is a comparison judged with a confidence interval:
a paired bootstrap over prompts for toxicity differences, a Wilson interval over neurons for a
share of neurons, a Fisher interval for a correlation. One criterion style for all
(:class:`ClaimsConfig` holds the numbers, ``claims`` in the config):

- a claim that something **cuts**, **beats** or is a **minority** holds when the whole CI is on
  its side of the threshold, is ``not significant`` when only the estimate is, else ``does not
  hold``;
- a claim that something **matches** or is **comparable** (or **about** a value, or
  **uncorrelated**) holds when the whole CI lies inside the equivalence margin, does not hold
  when the whole CI lies outside it, and is ``not significant`` otherwise ("matches or beats"
  is one-sided: the CI's upper end within the margin);
- a condition that supports a claim must pass the quality gate: its generation-like
  log-perplexity, F1, bigram repetition and share of empty continuations within the
  configured bounds of the base model's. A claim that would hold on a condition that fails it
  gets ``holds only for a broken model``; the ``quality`` column says what failed.

What is chosen is chosen on one seeded half of the evaluation prompts and reported on the
other (``claims.held_out``; false chooses and reports on every prompt, as the papers did):
C5's least toxic editing point, and the patched neurons with their DPO means, which C2 and C4
take cross-fitted (``patch-SET-cross-fit``: each half's groups and means judged on the other
half's prompts) wherever ``sweeps.cross_fit`` evaluated them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpotox.outputs.evals import condition_scores, paired_bootstrap, paired_scores
from dpotox.plan.conditions import Editing, ModelRun, Patching, prompt_halves, try_parse
from dpotox.plan.config import section_settings

FOUR, DPO, BASE = Patching("four-groups").name, ModelRun("dpo").name, ModelRun("base").name
FOUR_CROSS = Patching("four-groups", fit="cross").name
CLAIM_COLUMNS = ["claim", "paper", "evidence", "value", "ci_low", "ci_high", "verdict", "quality"]
HOLDS, NOT_SIGNIFICANT, FAILS = "holds", "not significant", "does not hold"
BROKEN, NOT_EVALUATED = "holds only for a broken model", "not evaluated"
Y25 = "Yang et al. 2025"
CLAIMS = {  # key: (the claim, where the papers make it)
    "C1": ("DPO cuts toxicity at near-flat perplexity", f"Lee et al. 2024; {Y25}, Table 2"),
    "C2": ("toxic neurons explain a minority of DPO's effect", f"{Y25}, Table 3"),
    "C3": ("about half the neurons reduce their projection on the probe", f"{Y25}, Table 18"),
    "C4": ("the four groups together match or beat DPO", f"{Y25}, Table 2"),
    "C5": ("editing beats DPO at similar perplexity", f"{Y25}, Tables 2, 19"),
    "C6": ("probe-free editing is comparable to probe-based", f"{Y25}, Table 2"),
    "C7": ("activation shifts are uncorrelated with probe alignment", f"{Y25}, Table 17"),
}


@dataclass
class ClaimsConfig:
    """The ``claims`` section of the config: the margins and the quality gate (defaults and
    help: the schema)."""

    equivalence_margin: float = 0.05
    similar_log_ppl: float = math.log(1.05)
    minority_pct: float = 50.0
    half_band_pct: float = 15.0
    uncorrelated_r: float = 0.1
    gate_log_ppl: float = 0.5
    gate_f1_ratio: float = 0.5
    gate_repetition: float = 0.5
    gate_empty_share: float = 0.2
    held_out: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClaimsConfig:
        return section_settings(cls, cfg, "claims")


def criteria(cc: ClaimsConfig) -> str:
    """The footer of table_claims: every criterion with its numbers."""
    return (
        "value [CI]: toxicity differences by a paired bootstrap over prompts; C3 a Wilson "
        "interval over neurons; C7 a Fisher interval. `holds`: the CI is on the claim's side "
        "(cuts, beats, minority) or inside the margin (matches, comparable, about, "
        "uncorrelated); `not significant`: only the estimate is; `does not hold`: neither (for "
        "a margin claim: the CI is wholly outside it). Criteria (dpotox.outputs.claims): C1 "
        "DPO minus base below 0 with DPO's generation-like log-PPL at most "
        f"{cc.similar_log_ppl:.3f} above base's; C2 the largest recovered share below "
        f"{cc.minority_pct:g}%; C3 the share of reducing neurons within 50 +/- "
        f"{cc.half_band_pct:g} points; C4 four groups minus DPO at most "
        f"+{cc.equivalence_margin:g}; C5 the least toxic probe-based editing within "
        f"{cc.similar_log_ppl:.3f} of DPO's generation-like log-PPL, minus DPO, below 0; C6 "
        f"probe-free minus probe-based within +/- {cc.equivalence_margin:g} at every beta/alpha; "
        f"C7 r(shift, cos) within +/- {cc.uncorrelated_r:g}. Quality gate on the supporting "
        f"condition: generation-like log-PPL at most {cc.gate_log_ppl:g} above base's, F1 at "
        f"least {cc.gate_f1_ratio:g} x base's, bigram repetition at most "
        f"{cc.gate_repetition:g}, empty continuations at most {cc.gate_empty_share:g}; a claim "
        "that would hold on a condition failing it: `holds only for a broken model`. "
        + (
            "C5's choice (the least toxic editing point) is made on a seeded half of the "
            "evaluation prompts and reported on the other half; C2 and C4 take the patches "
            "cross-fitted where evaluated (each half's neurons and DPO means on the other "
            "half's prompts)."
            if cc.held_out
            else "C5's choice (the least toxic editing point) is made and reported on every "
            "evaluation prompt, and C2 and C4 take the patches fitted on every prompt "
            "(claims.held_out: false)."
        )
    )


def below(point: float, low: float, high: float, threshold: float) -> str:
    """A cuts/beats/minority claim: the whole CI below ``threshold``."""
    if math.isnan(point):
        return NOT_EVALUATED
    if high < threshold:
        return HOLDS
    return NOT_SIGNIFICANT if point < threshold else FAILS


def within(point: float, low: float, high: float, lo: float, hi: float) -> str:
    """A matches/comparable/about claim: the whole CI inside ``[lo, hi]`` holds, the whole CI
    outside it does not."""
    if math.isnan(point):
        return NOT_EVALUATED
    if lo <= low and high <= hi:
        return HOLDS
    if high < lo or low > hi:
        return FAILS
    return NOT_SIGNIFICANT


def gen_log_ppl(s: Mapping[str, Any]) -> float:
    """The generation-like log-perplexity of a summary (NaN where it was not computed)."""
    v = s.get("log_ppl_generation")
    return math.nan if v is None or s.get("ppl_note") else float(v)


def quality_problems(s: Mapping[str, Any], base: Mapping[str, Any], cc: ClaimsConfig) -> list[str]:
    """What of the quality gate ``s`` fails, against the base model's summary ``base``."""
    out = []
    ppl, ppl0 = gen_log_ppl(s), gen_log_ppl(base)
    if not math.isnan(ppl) and not math.isnan(ppl0) and ppl - ppl0 > cc.gate_log_ppl:
        out.append(f"generation-like log-PPL {ppl:.2f} vs base {ppl0:.2f}")
    f1, f10 = s.get("f1"), base.get("f1")
    if f1 is not None and f10 and not s.get("f1_note") and f1 < cc.gate_f1_ratio * f10:
        out.append(f"F1 {f1:.3f} vs base {f10:.3f}")
    if (rep := s.get("repetition")) is not None and rep > cc.gate_repetition:
        out.append(f"repetition {rep:.2f}")
    if (empty := s.get("empty_share")) is not None and empty > cc.gate_empty_share:
        out.append(f"{100 * empty:.0f}% empty continuations")
    return out


def _gate(
    verdict: str, conditions: list[str], summ: dict[str, dict], cc: ClaimsConfig
) -> tuple[str, str]:
    """``(verdict, quality)``: ``holds`` becomes ``holds only for a broken model`` when a
    supporting condition fails the gate."""
    if BASE not in summ:
        return verdict, "not checked (no base model)"
    failed = {c: p for c in conditions if (p := quality_problems(summ[c], summ[BASE], cc))}
    if not failed:
        return verdict, "passes"
    text = "; ".join(f"{c}: {', '.join(p)}" for c, p in failed.items())
    return (BROKEN if verdict == HOLDS else verdict), f"fails ({text})"


def z_of(level: float) -> float:
    """The two-sided normal quantile of a confidence ``level`` (1.96 for 0.95)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def fisher_ci(r: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Fisher-z interval of a Pearson correlation over ``n`` pairs (95% by default)."""
    if math.isnan(r) or n < 4:
        return math.nan, math.nan
    f = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    se = 1 / math.sqrt(n - 3)
    return math.tanh(f - z * se), math.tanh(f + z * se)


def shift_cos_r(shift: pd.Series, cos: pd.Series) -> float:
    """C7's statistic: the Pearson r of the activation shift with the probe cosine over
    neurons (NaN where either is constant)."""
    x, y = shift.to_numpy(float), cos.to_numpy(float)
    return float(np.corrcoef(x, y)[0, 1]) if x.std() and y.std() else math.nan


def judge_claims(
    rows: list[str],
    summ: dict[str, dict],
    eval_dir: Path,
    boot: dict,
    table3: pd.DataFrame,
    neurons: pd.DataFrame | None = None,
    cc: ClaimsConfig | None = None,
) -> pd.DataFrame:
    """The seven findings (:data:`CLAIMS`), each judged as the module doc says, one row each;
    a finding whose conditions were not evaluated (or, for C3 and C7, without the neuron
    table) has no row."""
    cc = cc or ClaimsConfig()
    rows = set(rows)

    def diff(a: str, b: str, ids: list[str] | None = None) -> tuple[float, float, float]:
        return paired_bootstrap(
            paired_scores(eval_dir, [a, b], ids), lambda m: m[..., 0] - m[..., 1], **boot
        )

    def row(key: str, evidence: str, d: tuple, verdict: str, support: list[str]) -> list:
        verdict, quality = _gate(verdict, support, summ, cc) if support else (verdict, "–")
        return [CLAIMS[key][0], CLAIMS[key][1], evidence, *d, verdict, quality]

    out = []
    # C1: DPO cuts toxicity, perplexity near flat.
    if {BASE, DPO} <= rows:
        d = diff(DPO, BASE)
        rise = gen_log_ppl(summ[DPO]) - gen_log_ppl(summ[BASE])
        verdict = below(*d, 0.0)
        if math.isnan(rise):
            # Without the generation-like perplexity (evaluation.ppl_variants) "near-flat"
            # cannot be judged.
            verdict = NOT_EVALUATED
        elif verdict == HOLDS and rise > cc.similar_log_ppl:
            verdict = FAILS
        out.append(
            row(
                "C1",
                f"toxicity, DPO minus base; generation-like log-PPL {rise:+.3f} (DPO minus base)",
                d,
                verdict,
                [DPO],
            )
        )
    # C2: table 3's recovered shares of the patch-toxic-* rows (means, not per-prompt),
    # cross-fitted where they were.
    t3 = table3[table3["condition"].isin(rows) & table3["recovered_pct"].notna()]
    crossed = t3["condition"].map(lambda c: getattr(try_parse(c), "fit", None) == "cross")
    t3 = t3[crossed] if cc.held_out and crossed.any() else t3[~crossed]
    if len(t3):
        r = t3.loc[t3["recovered_pct"].idxmax()]
        d = (r["recovered_pct"], r["recovered_ci_low"], r["recovered_ci_high"])
        out.append(
            row(
                "C2",
                f"{r['condition']}: share of DPO's reduction recovered (%), the largest of "
                f"{len(t3)}",
                d,
                below(*d, cc.minority_pct),
                [r["condition"]],
            )
        )
    if neurons is not None and len(neurons):
        # C3: the share of neurons whose projection on the probe fell.
        k, n = int((neurons["delta"] > 0).sum()), len(neurons)
        lo, hi = wilson(k, n, z_of(float(boot.get("level", 0.95))))
        d = (100 * k / n, 100 * lo, 100 * hi)
        band = (50 - cc.half_band_pct, 50 + cc.half_band_pct)
        out.append(
            row(
                "C3",
                f"{k} of {n} neurons reduce their projection (%)",
                d,
                within(*d, *band),
                [],
            )
        )
    # C4: the four groups together match or beat DPO (one-sided margin).
    four = FOUR_CROSS if cc.held_out and FOUR_CROSS in rows else FOUR
    if {four, DPO} <= rows:
        d = diff(four, DPO)
        out.append(
            row(
                "C4",
                f"toxicity, {four} ({summ[four]['toxicity']:.3f}) minus DPO "
                f"({summ[DPO]['toxicity']:.3f})",
                d,
                within(*d, -math.inf, cc.equivalence_margin),
                [four],
            )
        )
    # C5: the least toxic probe-based editing within similar perplexity beats DPO.
    if DPO in rows and math.isnan(gen_log_ppl(summ[DPO])):
        out.append(
            row(
                "C5",
                "DPO has no generation-like log-PPL (evaluation.ppl_variants lacks generation)",
                (math.nan,) * 3,
                NOT_EVALUATED,
                [],
            )
        )
    elif DPO in rows:
        limit = gen_log_ppl(summ[DPO]) + cc.similar_log_ppl
        edits = sorted(c for c in rows if _editing(c, "probe"))
        similar = [c for c in edits if gen_log_ppl(summ[c]) <= limit]
        if similar:
            tune = held = None
            if cc.held_out:
                ids = list(condition_scores(eval_dir, DPO).index)
                tune, held = prompt_halves(ids, int(boot.get("seed", 0)))
            best = min(
                similar,
                key=lambda c: (
                    summ[c]["toxicity"]
                    if tune is None
                    else float(condition_scores(eval_dir, c).loc[tune].mean())
                ),
            )
            d = diff(best, DPO, held)
            where = (
                f"; chosen on {len(tune)} prompts, reported on the other {len(held)}"
                if tune is not None
                else ""
            )
            out.append(
                row(
                    "C5",
                    f"toxicity, {best} (generation-like log-PPL "
                    f"{gen_log_ppl(summ[best]):.3f}) minus DPO ({gen_log_ppl(summ[DPO]):.3f}); "
                    f"the least toxic of {len(similar)} of {len(edits)} editing conditions "
                    f"within {cc.similar_log_ppl:.3f}{where}",
                    d,
                    below(*d, 0.0),
                    [best],
                )
            )
        elif edits:
            out.append(
                row(
                    "C5",
                    f"none of {len(edits)} editing conditions has a generation-like log-PPL "
                    f"within {cc.similar_log_ppl:.3f} of DPO's ({gen_log_ppl(summ[DPO]):.3f})",
                    (math.nan,) * 3,
                    FAILS,
                    [],
                )
            )
    # C6: probe-free editing comparable to probe-based, at every beta/alpha run both ways.
    pairs = [
        (c, twin)
        for c in sorted(rows)
        if (e := _editing(c, "free", "cos"))
        and (twin := Editing("probe", "cos", e.beta, e.alpha).name) in rows
    ]
    if pairs:
        diffs = {free: diff(free, probe) for free, probe in pairs}
        worst = max(diffs, key=lambda c: abs(diffs[c][0]))
        verdicts = [
            within(*v, -cc.equivalence_margin, cc.equivalence_margin) for v in diffs.values()
        ]
        verdict = (
            FAILS
            if FAILS in verdicts
            else NOT_SIGNIFICANT
            if NOT_SIGNIFICANT in verdicts
            else HOLDS
        )
        out.append(
            row(
                "C6",
                f"toxicity, {worst} minus its probe-based twin; the largest of {len(pairs)} "
                "beta/alpha pairs",
                diffs[worst],
                verdict,
                [c for pair in pairs for c in pair],
            )
        )
    if neurons is not None and len(neurons) > 3:
        # C7: Pearson r of the activation shift with the probe cosine, over neurons.
        r = shift_cos_r(neurons["shift"], neurons["cos"])
        lo, hi = fisher_ci(r, len(neurons), z_of(float(boot.get("level", 0.95))))
        out.append(
            row(
                "C7",
                f"Pearson r of the activation shift with cos(v, w) over {len(neurons)} neurons",
                (r, lo, hi),
                within(r, lo, hi, -cc.uncorrelated_r, cc.uncorrelated_r),
                [],
            )
        )
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


def _editing(name: str, direction: str, selection: str | None = None) -> Editing | None:
    """``name`` parsed, if it is an editing condition with this direction (and selection)."""
    c = try_parse(name)
    if isinstance(c, Editing) and c.direction == direction and selection in (None, c.selection):
        return c
    return None
