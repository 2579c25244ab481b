"""The ``detoxify`` scorer: Unitary's Detoxify models (``original``: BERT on the same Jigsaw data;
``unbiased``: RoBERTa, Jigsaw Unintended Bias; ``multilingual``: XLM-R). The checkpoint (GitHub
release file, or local ``toxicity.checkpoint``) is read with ``torch.load(weights_only=True)``,
not Detoxify's unrestricted loader; model and tokenizer are built with transformers. The score is
sigmoid of the ``toxicity`` logit, as ``Detoxify.predict`` computes it.

"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpotox.errors import SourceError
from dpotox.scoring.base import OFFLINE_HINT, as_texts

DETOXIFY_VARIANTS = ("original", "unbiased", "multilingual")


# The (model, tokenizer) classes Detoxify's checkpoints name; a checkpoint's names are looked up
# in transformers only when they are on this list.
_DETOXIFY_ARCHS = {
    f"{a}ForSequenceClassification": f"{a}Tokenizer"
    for a in ("Bert", "Roberta", "XLMRoberta", "Albert")
}
# Buffers that older transformers saved and current ones recreate: safe to ignore.
_IGNORABLE_KEYS = ("position_ids", "token_type_ids")


class DetoxifyScorer:
    """A Detoxify model; ``score`` = sigmoid of its ``toxicity`` logit, as ``Detoxify.predict``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        class_names: Sequence[str],
        *,
        name: str,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        renames = {
            "toxic": "toxicity",
            "severe_toxic": "severe_toxicity",
            "identity_hate": "identity_attack",
        }  # Detoxify's standard names
        self.class_names = [renames.get(c, c) for c in class_names]
        if "toxicity" not in self.class_names:
            raise SourceError(f"Detoxify checkpoint has no toxicity class: {self.class_names}")
        self.index = self.class_names.index("toxicity")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        # Hub tokenizers cap at 512 like Detoxify's; a bare local vocab has no cap, so use the
        # model's positions (RoBERTa reserves padding_idx + 1 of them).
        positions = getattr(model.config, "max_position_embeddings", 512)
        if model.config.model_type in ("roberta", "xlm-roberta"):
            positions -= model.config.pad_token_id + 1
        self.max_length = min(tokenizer.model_max_length, positions)

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """float64 P(toxicity) per text, ``batch_size`` texts per forward pass."""
        texts = as_texts(texts)
        out = np.zeros(len(texts))
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            enc = self.tokenizer(
                batch,
                return_tensors="pt",
                truncation=True,
                padding=True,
                max_length=self.max_length,
            ).to(self.device)
            logits = self.model(**enc).logits[:, self.index]
            out[start : start + len(batch)] = torch.sigmoid(logits.double()).cpu().numpy()
        return out


def _detoxify_checkpoint(variant: str, checkpoint: str | Path | None, device: str) -> dict:
    # weights_only=True: a checkpoint can then hold tensors and plain containers, never code.
    # (Detoxify itself loads with weights_only=False.)
    if checkpoint is None:
        from detoxify.detoxify import MODEL_URLS

        url = MODEL_URLS[variant]
        try:
            loaded = torch.hub.load_state_dict_from_url(url, map_location=device, weights_only=True)
        except OSError as err:  # URLError, ConnectionError, timeouts, SSL errors
            raise SourceError(
                f"the Detoxify checkpoint ({variant}) could not be downloaded from {url} (no "
                f"network?): {err}. Set config key `toxicity.checkpoint` to a local copy of that "
                f"file, {OFFLINE_HINT}"
            ) from err
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise SourceError(
                f"the Detoxify checkpoint from {url} cannot be loaded as weights "
                f"only (pickled objects are refused): {err}"
            ) from err
        where = url
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise SourceError(
                f"config key `toxicity.checkpoint`: {str(path)!r} is not a file; "
                f"give a local Detoxify checkpoint, {OFFLINE_HINT}"
            )
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise SourceError(
                f"config key `toxicity.checkpoint`: {path} cannot be loaded as "
                f"weights only (pickled objects are refused): {err}"
            ) from err
        where = f"config key `toxicity.checkpoint` ({path})"
    if not (isinstance(loaded, dict) and "config" in loaded and "state_dict" in loaded):
        raise SourceError(f"{where}: a Detoxify checkpoint holds 'config' and 'state_dict'")
    return loaded


def load_detoxify(
    variant: str = "original",
    *,
    checkpoint: str | Path | None = None,
    tokenizer: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> DetoxifyScorer:
    """A Detoxify scorer from a local or downloaded checkpoint.

    ``tokenizer`` is a local folder with the base model's Hugging Face ``config.json`` and
    tokenizer files (bert-base-uncased / roberta-base / xlm-roberta-base); without it they come
    from the hub or its cache. Raises SourceError naming the config key to change.
    """
    import transformers

    loaded = _detoxify_checkpoint(variant, checkpoint, device)
    try:
        arch = loaded["config"]["arch"]["args"]
        classes = list(loaded["config"]["dataset"]["args"]["classes"])
        model_name, tokenizer_name = arch["model_name"], arch["tokenizer_name"]
    except (KeyError, TypeError) as err:
        raise SourceError(f"Detoxify checkpoint config lacks {err}") from err
    if _DETOXIFY_ARCHS.get(model_name) != tokenizer_name:
        raise SourceError(
            f"Detoxify checkpoint names unsupported classes {model_name}, {tokenizer_name}"
        )
    model_cls = getattr(transformers, model_name)
    source, local = (str(tokenizer), True) if tokenizer is not None else (arch["model_type"], False)
    try:
        config = model_cls.config_class.from_pretrained(
            source, num_labels=int(arch["num_classes"]), local_files_only=local
        )
        tok = getattr(transformers, tokenizer_name).from_pretrained(source, local_files_only=local)
    except Exception as err:  # hub, cache and file errors come in many types; all mean the same
        raise SourceError(
            f"cannot load the Hugging Face config and tokenizer of {source!r} for Detoxify "
            f"({str(err).rstrip('.')}). "
            "Set config key `toxicity.tokenizer` to a local folder with its config.json and "
            f"tokenizer files, {OFFLINE_HINT}"
        ) from err
    model = model_cls(config)
    try:
        result = model.load_state_dict(loaded["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise SourceError(f"Detoxify checkpoint does not fit {model_name}: {err}") from err
    unexpected = [k for k in result.unexpected_keys if not k.endswith(_IGNORABLE_KEYS)]
    if result.missing_keys or unexpected:
        raise SourceError(
            f"Detoxify checkpoint does not fit {model_name}: missing "
            f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )
    return DetoxifyScorer(
        model, tok, classes, name=f"detoxify-{variant}", batch_size=batch_size, device=device
    )
