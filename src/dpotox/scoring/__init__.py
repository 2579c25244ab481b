"""Toxicity scorers behind one interface: ``load_scorer(cfg).score(texts)`` -> P(toxic).

One module per scorer family: :mod:`.bilstm` (``jigsaw-bilstm``, the offline default: tox-block's
Jigsaw BiLSTM run in torch, and ``tcc-bilstm``, toxic-comment-classifier's, the offline second
scorer) and :mod:`.detoxify` (``detoxify``: Unitary's Detoxify models); :mod:`.base` is the
interface they share. Each module's docstring says what it scores and how
its files are read safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpotox.errors import ConfigError
from dpotox.scoring.base import ToxicityScorer
from dpotox.scoring.bilstm import (
    JIGSAW_RESCALE,
    JigsawBiLSTMScorer,
    KerasTextEncoder,
    load_jigsaw_bilstm,
    load_keras_tokenizer,
    load_tcc_bilstm,
)
from dpotox.scoring.detoxify import DETOXIFY_VARIANTS, load_detoxify

__all__ = [
    "JIGSAW_RESCALE",
    "JigsawBiLSTMScorer",
    "KerasTextEncoder",
    "SCORERS",
    "ToxicityScorer",
    "load_detoxify",
    "load_jigsaw_bilstm",
    "load_keras_tokenizer",
    "load_scorer",
    "load_tcc_bilstm",
    "pairs_scorer_settings",
    "second_scorer_settings",
]

SCORERS = ("jigsaw-bilstm", "tcc-bilstm", "detoxify")


def pairs_scorer_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``toxicity`` section with the scorer of the pairs (``dpo.pairs.scorer``) in place of
    the evaluation's: what :func:`load_scorer` takes for the pairs' scorer. ``cfg`` is the
    whole (validated) config or a rule's part of it."""
    pairs = (cfg.get("dpo") or {}).get("pairs") or {}
    return {**(cfg.get("toxicity") or {}), "scorer": pairs.get("scorer", "tcc-bilstm")}


def second_scorer_settings(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """What evaluations score with beside ``toxicity.scorer``: the pairs' scorer, or None
    where the two are the same scorer (``dpo.pairs.same_scorer``)."""
    pairs = pairs_scorer_settings(cfg)
    main = (cfg.get("toxicity") or {}).get("scorer", "jigsaw-bilstm")
    return None if pairs["scorer"] == main else pairs


def load_scorer(cfg: Mapping[str, Any], *, device: str = "cpu") -> ToxicityScorer:
    """The scorer that the validated ``toxicity`` config section asks for.

    Raises:
        ConfigError: unknown ``toxicity.scorer`` or ``toxicity.detoxify_variant``.
        SourceError: the scorer's files cannot be found, downloaded or read.
    """
    scorer = cfg.get("scorer", "jigsaw-bilstm")
    batch_size = int(cfg.get("batch_size") or 64)
    if scorer == "jigsaw-bilstm":
        return load_jigsaw_bilstm(batch_size=batch_size, device=device)
    if scorer == "tcc-bilstm":
        return load_tcc_bilstm(batch_size=batch_size, device=device)
    if scorer == "detoxify":
        variant = cfg.get("detoxify_variant") or "original"
        if variant not in DETOXIFY_VARIANTS:
            raise ConfigError(
                f"config key 'toxicity.detoxify_variant': {variant!r} is not one "
                f"of {', '.join(DETOXIFY_VARIANTS)}"
            )
        return load_detoxify(
            variant,
            checkpoint=cfg.get("checkpoint"),
            tokenizer=cfg.get("tokenizer"),
            batch_size=batch_size,
            device=device,
        )
    raise ConfigError(
        f"config key 'toxicity.scorer': {scorer!r} is not a known scorer; "
        f"choose one of {', '.join(SCORERS)}"
    )
