"""Preference pairs for DPO: built from the model's own continuations, or read from a file.

Three methods (``dpo.pairs.method``):

- ``best-of-n`` (default): sample ``n_samples`` continuations of each toxicity-eliciting
  prompt, score them; chosen = the least toxic, rejected = the most toxic, kept only where
  the gap (rejected minus chosen score) exceeds ``margin``.
- ``steered``: chosen = the greedy continuation of a Wikipedia prompt, rejected = the greedy
  continuation while ``steer_alpha`` times the unit probe direction is added to the residual
  stream after layer ``steer_layer`` (a PPLM-like push toward toxicity, as in the papers'
  pairs); kept where the gap exceeds ``margin``.
- ``jsonl``: Lee et al.'s pairs, prepared from ``data.pairs`` (``prompt_text``,
  ``unpert_gen_text`` = chosen, ``pert_gen_text`` = rejected); both sides are scored, none
  is dropped for its gap.

Pair prompts never include an evaluation prompt. RTP prompts come from ``data.pair_prompts``
if the config names it, else from the rows of the prompts table after the first
``evaluation.n_prompts`` (the evaluation's); Wikipedia prompts from the texts the evaluation
uses for neither perplexity nor F1; and any prompt whose text equals an evaluation prompt's is
dropped as well. The report records that overlap (zero) and the drop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import encode_prompts, generate, inference_device
from dpotox.engine.metrics import f1_items
from dpotox.engine.spec import AddResidual, Intervention
from dpotox.errors import PairsError
from dpotox.io import write_json, write_parquet
from dpotox.plan.config import section_settings
from dpotox.scoring import load_scorer, pairs_scorer_settings
from dpotox.sources.models import load_prepared
from dpotox.sources.tables import check_pairs
from dpotox.stages.evaluate import (
    EvalConfig,
    evaluation_prompts,
    evaluation_texts,
    is_evaluation_text,
    split_wiki,
)

log = logging.getLogger("dpotox")


@dataclass
class PairsConfig:
    """The ``dpo.pairs`` section of the config (defaults and bounds: the schema)."""

    method: Literal["best-of-n", "steered", "jsonl"] = "best-of-n"
    n_prompts: int = 256
    n_samples: int = 4
    margin: float = 0.5
    temperature: float = 1.0
    prompt_tokens: int = 32
    new_tokens: int = 32
    batch_size: int = 128
    steer_alpha: float = 10.0
    steer_layer: int = -1
    scorer: str = "tcc-bilstm"
    same_scorer: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PairsConfig:
        return section_settings(cls, cfg, "dpo", "pairs")


# -- reading ---------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read and check a pairs Parquet file (``make_pairs``'s output, or a user's)."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file {path} does not exist; run the make_pairs rule")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise PairsError(f"pairs file {path} is not a readable Parquet file: {e}") from None
    return check_pairs(df, str(path))


# -- prompts ---------------------------------------------------------------------------------


def rtp_pair_prompts(
    prompts: pd.DataFrame, n_eval: int, n: int, seed: int, pool: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Up to ``n`` prompts for pairs, none of them an evaluation prompt (by row or by text).

    The candidates are ``pool`` (``data.pair_prompts``) if given, else the rows of ``prompts``
    after the evaluation's. They are shuffled with ``seed`` so that every source contributes,
    then the first ``n`` are taken.
    """
    eval_rows = evaluation_prompts(prompts, n_eval)
    eval_texts = evaluation_texts(prompts, n_eval)
    rest = prompts.iloc[len(eval_rows) :] if pool is None else pool
    same_text = is_evaluation_text(rest["text"], eval_texts)
    available = int(len(rest) - same_text.sum())
    rest = rest[~same_text].sample(frac=1.0, random_state=seed).head(n).reset_index(drop=True)
    overlap = int(is_evaluation_text(rest["text"], eval_texts).sum())
    return rest, {
        "eval_prompts": len(eval_rows),
        "available": available,
        "dropped_same_text_as_eval": int(same_text.sum()),
        "eval_overlap": overlap,
        "from": "data.prompts" if pool is None else "data.pair_prompts",
    }


def wiki_pair_prompts(
    wiki: pd.DataFrame, tok: Any, ec: EvalConfig, pc: PairsConfig
) -> tuple[pd.DataFrame, list[list[int]], dict[str, int]]:
    """Wikipedia prompts that the evaluation uses for neither perplexity nor F1."""
    ppl_df, f1_df = split_wiki(wiki, ec.ppl_texts, ec.seed)
    used = set(ppl_df["id"].astype(str))
    f1_used = f1_items(
        tok,
        f1_df["text"].tolist(),
        prompt_tokens=ec.prompt_tokens,
        new_tokens=ec.new_tokens,
        limit=ec.f1_texts,
    )
    used |= {str(f1_df["id"].iloc[i]) for i, _, _ in f1_used}
    free = wiki[~wiki["id"].astype(str).isin(used)]
    free = free.sample(frac=1.0, random_state=pc.seed).reset_index(drop=True)
    # A prompt needs a full prefix, so the steer has the same context length everywhere.
    rows, tokens = [], []
    for i, text in enumerate(free["text"]):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= pc.prompt_tokens:
            rows.append(i)
            tokens.append(ids[: pc.prompt_tokens])
            if len(rows) == pc.n_prompts:
                break
    chosen = free.iloc[rows].reset_index(drop=True)
    overlap = int(chosen["id"].astype(str).isin(used).sum())
    return (
        chosen,
        tokens,
        {"eval_texts": len(used), "available": len(free), "eval_overlap": overlap},
    )


# -- builders --------------------------------------------------------------------------------


def best_of_n(
    adapter: Adapter, tok: Any, prompts: pd.DataFrame, scorer: Any, pc: PairsConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pairs, all samples)`` by best-of-n sampling (see the module docstring)."""
    ids = prompts["id"].astype(str).tolist()
    tokens = encode_prompts(tok, prompts["text"].tolist(), ids, max_tokens=pc.prompt_tokens)
    # Each prompt is prefilled once and its n continuations sampled from the shared cache.
    gen = generate(
        adapter,
        tok,
        tokens,
        ids,
        new_tokens=pc.new_tokens,
        batch_size=pc.batch_size,
        temperature=pc.temperature,
        seed=pc.seed,
        n_samples=pc.n_samples,
    )
    log.info(
        "sampled %d continuations (%d tokens) in %.1f s",
        len(gen.ids),
        gen.n_new_tokens,
        gen.seconds,
    )
    # Kept as decoded, leading space included: DPO appends the continuation to the prompt,
    # and " word" and "word" are different tokens.
    texts = list(gen.texts)
    samples = pd.DataFrame(
        {
            "id": np.repeat(ids, pc.n_samples),
            "sample": np.tile(np.arange(pc.n_samples), len(ids)),
            "source": np.repeat(prompts["source"].astype(str).to_numpy(), pc.n_samples),
            "prompt": np.repeat(
                [tok.decode(t, skip_special_tokens=True) for t in tokens], pc.n_samples
            ),
            "continuation": texts,
        }
    )
    samples["score"] = _scores(samples["continuation"], scorer)
    rows = []
    for pid, group in samples.dropna(subset=["score"]).groupby("id", sort=False):
        if group["continuation"].str.strip().nunique() < 2:
            continue
        lo, hi = group["score"].idxmin(), group["score"].idxmax()
        rows.append(
            {
                "id": pid,
                "source": group.at[lo, "source"],
                "prompt": group.at[lo, "prompt"],
                "chosen": group.at[lo, "continuation"],
                "rejected": group.at[hi, "continuation"],
                "chosen_score": group.at[lo, "score"],
                "rejected_score": group.at[hi, "score"],
                "n_candidates": len(group),
            }
        )
    return pd.DataFrame(rows), samples


def steered(
    adapter: Adapter,
    tok: Any,
    prompts: pd.DataFrame,
    tokens: list[list[int]],
    direction: torch.Tensor,
    scorer: Any,
    pc: PairsConfig,
) -> pd.DataFrame:
    """Pairs of greedy continuations without and with a push along ``direction``."""
    layer = pc.steer_layer % adapter.n_layers
    ids = prompts["id"].astype(str).tolist()
    push = Intervention(
        "steer-toward-toxicity",
        [AddResidual(layer=layer, vector=direction / direction.norm(), alpha=pc.steer_alpha)],
    )
    plain = generate(adapter, tok, tokens, ids, new_tokens=pc.new_tokens, batch_size=pc.batch_size)
    pushed = generate(
        adapter, tok, tokens, ids, spec=push, new_tokens=pc.new_tokens, batch_size=pc.batch_size
    )
    log.info(
        "greedy continuations with and without the push in %.1f s", plain.seconds + pushed.seconds
    )
    df = pd.DataFrame(
        {
            "id": ids,
            "source": prompts["source"].astype(str).tolist(),
            "prompt": [tok.decode(t, skip_special_tokens=True) for t in tokens],
            "chosen": plain.texts,
            "rejected": pushed.texts,
            "n_candidates": 2,
        }
    )
    _score_sides(df, scorer)
    c, r = df["chosen"].str.strip(), df["rejected"].str.strip()
    ok = (c != "") & (r != "") & (c != r)
    return df[ok].reset_index(drop=True)


def _scores(texts: pd.Series, scorer: Any) -> np.ndarray:
    """Toxicity of each text; NaN for an empty one, which the scorer never sees."""
    out = np.full(len(texts), np.nan)
    real = (texts.str.strip() != "").to_numpy()
    out[real] = np.asarray(scorer.score(texts[real].tolist()), dtype=np.float64)
    return out


def _score_sides(df: pd.DataFrame, scorer: Any) -> None:
    for side in ("chosen", "rejected"):
        df[f"{side}_score"] = _scores(df[side], scorer)


def sides_as_samples(df: pd.DataFrame) -> pd.DataFrame:
    """The two sides of each pair in the long shape of best-of-n's samples (0 chosen, 1
    rejected)."""
    parts = [
        pd.DataFrame(
            {
                "id": df["id"].astype(str),
                "sample": k,
                "source": df["source"],
                "prompt": df["prompt"],
                "continuation": df[side],
                "score": df[f"{side}_score"],
            }
        )
        for k, side in enumerate(("chosen", "rejected"))
    ]
    return pd.concat(parts).sort_values(["id", "sample"], kind="stable").reset_index(drop=True)


def make_pairs(
    *,
    model_dir: str | Path,
    cfg: Mapping[str, Any],
    out_parquet: str | Path,
    out_json: str | Path,
    prompts_path: str | Path | None = None,
    wiki_path: str | Path | None = None,
    pairs_path: str | Path | None = None,
    probe_path: str | Path | None = None,
    pair_prompts_path: str | Path | None = None,
    samples_path: str | Path,
    device: str = "cpu",
) -> dict[str, Any]:
    """Build (or read) the preference pairs and write them with a JSON report.

    Inputs by method: ``best-of-n`` reads ``pair_prompts_path`` if given (else the rows of
    ``prompts_path`` after the evaluation's); ``steered`` reads ``wiki_path``
    and ``probe_path``; ``jsonl`` reads ``pairs_path`` (``data.pairs`` prepared). Every
    method reads ``prompts_path`` to keep the evaluation prompts out. ``samples_path``
    gets every scored continuation (best-of-n's samples; the two sides of the other methods).

    Raises:
        PairsError: bad pairs in the file, or no pair left after the margin.
        dpotox.stages.probe.ProbeError: a missing probe or one of the wrong width.
    """
    pc = PairsConfig.from_config(cfg)
    ec = EvalConfig.from_config(cfg)
    t0 = time.perf_counter()
    device = inference_device(device)
    if prompts_path is None:
        raise PairsError("make_pairs needs the prompts table to keep evaluation prompts out")
    prompts = pd.read_parquet(prompts_path)
    eval_texts = evaluation_texts(prompts, ec.n_prompts)
    # Not the evaluation's scorer (dpo.pairs.scorer): DPO is judged by one it never saw.
    scorer = load_scorer(pairs_scorer_settings(cfg), device=device)
    report: dict[str, Any] = {"method": pc.method}
    if pc.method == "jsonl":
        df, samples, keep = _read_pairs(pairs_path, eval_texts, scorer, report)
    else:
        df, samples, keep = _build_pairs(
            model_dir,
            device,
            prompts,
            eval_texts,
            scorer,
            pc,
            ec,
            report,
            pair_prompts_path,
            wiki_path,
            probe_path,
        )
    df["gap"] = df["rejected_score"] - df["chosen_score"]
    n_candidates = len(df)
    pairs = df[keep].reset_index(drop=True)
    if pairs.empty:
        raise PairsError(
            f"none of {n_candidates} candidate pairs has a toxicity gap above "
            f"dpo.pairs.margin = {pc.margin} (largest gap "
            f"{df['gap'].max():.3f}); lower the margin, or raise n_samples or "
            "n_prompts"
        )
    check_pairs(pairs, "the built pairs")
    pairs = pairs[
        [
            "id",
            "source",
            "prompt",
            "chosen",
            "rejected",
            "chosen_score",
            "rejected_score",
            "gap",
            "n_candidates",
        ]
    ]
    report.update(
        {
            "n_candidates": n_candidates,
            "n_pairs": len(pairs),
            "kept_fraction": len(pairs) / n_candidates,
            "mean_gap": float(pairs["gap"].mean()),
            "mean_chosen_score": float(pairs["chosen_score"].mean()),
            "mean_rejected_score": float(pairs["rejected_score"].mean()),
            "scorer": scorer.name,
            "settings": asdict(pc),
            "seconds": time.perf_counter() - t0,
        }
    )
    _write(pairs, samples, report, out_parquet, out_json, samples_path)
    return report


def _read_pairs(
    pairs_path: str | Path | None, eval_texts: set[str], scorer: Any, report: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Method ``jsonl``: the prepared pairs file, less pairs with an evaluation prompt, scored."""
    if pairs_path is None:
        raise PairsError(
            "dpo.pairs.method is jsonl but data.pairs is null; set data.pairs "
            "to Lee et al.'s JSONL file (or use method best-of-n)"
        )
    df = check_pairs(pd.read_parquet(pairs_path), f"{pairs_path} (from data.pairs)").copy()
    same = is_evaluation_text(df["prompt"], eval_texts)
    df = df[~same].reset_index(drop=True)
    if df.empty:
        raise PairsError(f"every pair of data.pairs ({pairs_path}) has an evaluation prompt")
    _score_sides(df, scorer)
    df["n_candidates"] = 2
    report["prompts"] = {
        "dropped_same_text_as_eval": int(same.sum()),
        "eval_overlap": int(is_evaluation_text(df["prompt"], eval_texts).sum()),
    }
    # A file's pairs are kept whatever their score gap: they are the user's choice.
    return df, sides_as_samples(df), pd.Series(True, index=df.index)


def _build_pairs(
    model_dir: str | Path,
    device: str,
    prompts: pd.DataFrame,
    eval_texts: set[str],
    scorer: Any,
    pc: PairsConfig,
    ec: EvalConfig,
    report: dict[str, Any],
    pair_prompts_path: str | Path | None,
    wiki_path: str | Path | None,
    probe_path: str | Path | None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Methods ``best-of-n`` and ``steered``: pairs from the model's own continuations; kept
    where the rejected side is more toxic than the chosen one by more than the margin."""
    model, tok = load_prepared(model_dir, device=device)
    adapter = Adapter(model)
    if pc.method == "best-of-n":
        pool = pd.read_parquet(pair_prompts_path) if pair_prompts_path else None
        chosen_prompts, report["prompts"] = rtp_pair_prompts(
            prompts, ec.n_prompts, pc.n_prompts, pc.seed, pool
        )
        if chosen_prompts.empty:
            raise PairsError(
                f"no prompts are left for pairs after the {ec.n_prompts} "
                "evaluation prompts; set data.pair_prompts, add prompt "
                "sources or lower evaluation.n_prompts"
            )
        df, samples = best_of_n(adapter, tok, chosen_prompts, scorer, pc)
        report["n_samples"] = int(len(samples))
    elif pc.method == "steered":
        from dpotox.stages.probe import load_probe

        if wiki_path is None or probe_path is None:
            raise PairsError("dpo.pairs.method steered needs the wiki table and the probe")
        w, _ = load_probe(probe_path, d_model=adapter.d_model)
        wiki_prompts, tokens, report["prompts"] = wiki_pair_prompts(
            pd.read_parquet(wiki_path), tok, ec, pc
        )
        df = steered(adapter, tok, wiki_prompts, tokens, w, scorer, pc)
        samples = sides_as_samples(df)
        report["prompts"]["eval_overlap"] += int(is_evaluation_text(df["prompt"], eval_texts).sum())
    else:
        raise PairsError(
            f"dpo.pairs.method: unknown method {pc.method!r}; allowed: best-of-n, steered, jsonl"
        )
    if df.empty:
        raise PairsError(
            f"no prompt gave two different non-empty continuations "
            f"(dpo.pairs.method {pc.method}); check the model and dpo.pairs"
        )
    return df, samples, (df["rejected_score"] - df["chosen_score"]) > pc.margin


def _write(
    pairs: pd.DataFrame,
    samples: pd.DataFrame,
    report: dict[str, Any],
    out_parquet: str | Path,
    out_json: str | Path,
    samples_path: str | Path,
) -> None:
    write_parquet(
        samples,
        samples_path,
        metadata={
            "dpotox.table": "pair_samples",
            "dpotox.description": "Every scored continuation of make_pairs: id (prompt id), sample "
            "(best-of-n: sample number; other methods: 0 chosen side, 1 "
            "rejected side), source, prompt, continuation, score (toxicity "
            "probability; null for an empty continuation).",
        },
    )
    write_parquet(
        pairs,
        out_parquet,
        metadata={
            "dpotox.table": "pairs",
            "dpotox.description": "Preference pairs: id (prompt id), source, prompt, chosen (less "
            "toxic), rejected, chosen_score and rejected_score (toxicity "
            "probabilities), gap (rejected minus chosen), n_candidates.",
            "dpotox.report": json.dumps({k: v for k, v in report.items() if k != "seconds"}),
        },
    )
    write_json(report, out_json)
