"""Toxicity scorers behind one interface: ``load_scorer(cfg).score(texts)`` -> P(toxic).

One module per scorer: :mod:`.bilstm` (``jigsaw-bilstm``, the offline default: tox-block's
Jigsaw BiLSTM run in torch) and :mod:`.detoxify` (``detoxify``: Unitary's Detoxify models);
:mod:`.base` is the interface they share. Each module's docstring says what it scores and how
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
]

SCORERS = ("jigsaw-bilstm", "detoxify")


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
