"""What the caching benchmarks share: the embedded model and prompts, prepared by `make run`."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "resources/models/smollm2-135m/base"
PROMPTS = REPO / "resources/data/prompts.parquet"
WIKI = REPO / "resources/data/wiki.parquet"


def embedded_prompts(model_dir: Path, n: int, prompt_tokens: int = 32):
    """``(adapter, tokenizer, token ids, prompt ids)`` of the first ``n`` prompts on the model."""
    from dpotox.engine.arch import Adapter
    from dpotox.engine.generate import encode_prompts, flush_denormals
    from dpotox.sources import load_prepared

    for path in (model_dir, PROMPTS):
        if not path.exists():
            sys.exit(
                f"{path} is missing: run `make run` (or `snakemake --profile profiles/local "
                f"resources/models/smollm2-135m/base resources/data/prompts.parquet`) first"
            )
    table = pd.read_parquet(PROMPTS)
    if len(table) < n:
        sys.exit(f"{PROMPTS} has {len(table)} prompts, fewer than the {n} asked for")
    table = table.head(n)
    flush_denormals()
    model, tok = load_prepared(model_dir)
    ids = table["id"].astype(str).tolist()
    return (
        Adapter(model),
        tok,
        encode_prompts(tok, table["text"].tolist(), ids, max_tokens=prompt_tokens),
        ids,
    )
