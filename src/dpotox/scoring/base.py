"""What every toxicity scorer offers: a name and a batched ``score``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

OFFLINE_HINT = "or use the offline scorer with `toxicity.scorer: jigsaw-bilstm`"


@runtime_checkable
class ToxicityScorer(Protocol):
    """What every scorer offers: a name for outputs and a batched ``score``."""

    name: str

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """float64 P(toxic) in [0, 1], one per text, in order (batched internally)."""
        ...


def as_texts(texts: Sequence[str]) -> list[str]:
    # A bare string is a sequence of characters: scoring it letter by letter is never meant.
    if isinstance(texts, str):
        raise TypeError("score() takes a sequence of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    return texts
