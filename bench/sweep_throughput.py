"""Sweep throughput: 16 conditions evaluated one at a time, and together with shared prefills.

    python bench/sweep_throughput.py [--prompts 160] [--conditions 16] [--batch-size 128]

On the embedded model, generates the evaluation's greedy continuations (20 tokens of the first
``--prompts`` prompts, cut to 32 tokens) under ``--conditions`` intervention specs of the kinds
a sweep runs at the generation positions (ablations, patches, per-prompt patches, activation
edits, built from random neuron sets, since they cost the same as the real ones). First each
condition alone (``dpotox.engine.generate.greedy``, as a job per condition does), then all of
them in one call (``dpotox.engine.generate.generate_many``, as a sweep job does). Checks that
every condition's
tokens are the same both ways and prints both times and their ratio. Target: at least 2.

Then the generation-like perplexity (``evaluation.ppl_positions: generation``) of the first
``--ppl-texts`` Wikipedia texts under the same conditions but the per-prompt ones (which need
rows for the texts): each condition alone (``dpotox.engine.metrics.log_perplexity``, every
call computing the unedited context itself), and all in one call
(``dpotox.engine.metrics.log_perplexities``, the context computed once per batch, as a sweep
job does); checks the numbers agree to 1e-5. ``--ppl-texts 0`` skips it, ``--skip-generation``
runs only it. The last line is ``RESULT alone_s=<a> shared_s=<b> ratio=<a/b>
ppl_alone_s=<c> ppl_shared_s=<d> ppl_ratio=<c/d>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import MODEL_DIR, WIKI, embedded_prompts


def conditions(adapter, ids: list[str], n: int, seed: int = 0) -> list:
    """``n`` specs cycling through the sweep's generation-position kinds."""
    from dpotox.engine.spec import Intervention, ScaleNeurons, SetNeurons

    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        kind = ("ablate", "patch", "per-prompt", "edit")[i % 4]
        edits = []
        for layer in range(adapter.n_layers):
            k = [20, 200, 60, adapter.d_mlp // 2][i % 4]
            idx = torch.randperm(adapter.d_mlp, generator=g)[:k]
            if kind == "ablate":
                edits.append(SetNeurons(layer, idx, torch.tensor(0.0)))
            elif kind == "patch":
                edits.append(SetNeurons(layer, idx, 0.1 * torch.randn(k, generator=g)))
            elif kind == "per-prompt":
                edits.append(
                    SetNeurons(
                        layer, idx, 0.1 * torch.randn(len(ids), k, generator=g), prompt_ids=ids
                    )
                )
            else:
                factors = 1 + 0.2 * torch.sign(torch.randn(k, generator=g))
                edits.append(ScaleNeurons(layer, idx, factors))
        specs.append(Intervention(f"{kind}-{i}", edits))
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--ppl-texts", type=int, default=24)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    adapter, tok, prompts, ids = embedded_prompts(args.model_dir, args.prompts)
    specs = conditions(adapter, ids, args.conditions)
    print(
        f"{len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.1f} tokens), "
        f"20 new tokens, batch {args.batch_size}, {len(specs)} conditions, "
        f"{torch.get_num_threads()} threads"
    )
    fields = []
    if not args.skip_generation:
        alone_s, shared_s = generation(adapter, tok, prompts, ids, specs, args.batch_size)
        fields.append(
            f"alone_s={alone_s:.2f} shared_s={shared_s:.2f} ratio={alone_s / shared_s:.3f}"
        )
    if args.ppl_texts:
        alone_s, shared_s = perplexity(adapter, tok, specs, args.ppl_texts)
        fields.append(
            f"ppl_alone_s={alone_s:.2f} ppl_shared_s={shared_s:.2f} "
            f"ppl_ratio={alone_s / shared_s:.3f}"
        )
    print("RESULT " + " ".join(fields))


def generation(adapter, tok, prompts, ids, specs, batch_size: int) -> tuple[float, float]:
    """Seconds of the conditions' greedy continuations alone and shared (tokens checked)."""
    from dpotox.engine.generate import generate_many, greedy

    greedy(adapter, tok, prompts[:8], ids[:8], new_tokens=4)  # warm up kernels and allocator
    t0 = time.perf_counter()
    alone = [
        greedy(adapter, tok, prompts, ids, spec=s, new_tokens=20, batch_size=batch_size).new_tokens
        for s in specs
    ]
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shared = generate_many(adapter, tok, prompts, ids, specs, new_tokens=20, batch_size=batch_size)
    shared_s = time.perf_counter() - t0
    same = [g.new_tokens == a for g, a in zip(shared, alone, strict=True)]
    print(
        f"alone: {alone_s:.1f} s ({alone_s / len(specs):.2f} s per condition); "
        f"shared: {shared_s:.1f} s ({shared_s / len(specs):.2f} s per condition); "
        f"identical tokens: {sum(same)}/{len(same)} conditions"
    )
    if not all(same):
        sys.exit("the shared evaluation gave other tokens than evaluating alone")
    return alone_s, shared_s


def perplexity(adapter, tok, specs, n_texts: int) -> tuple[float, float]:
    """Seconds of the conditions' generation-like perplexity alone and in one call (checked)."""
    import pandas as pd

    from dpotox.engine.metrics import log_perplexities, log_perplexity, windows

    if not WIKI.exists():
        sys.exit(f"{WIKI} is missing: run `make run` first")
    texts = pd.read_parquet(WIKI).head(n_texts)
    win_ids, wins = windows(tok, texts["text"].tolist(), texts["id"].astype(str).tolist(), 256)
    specs = [None, *(s for s in specs if not s.per_prompt)]
    kw = {"batch_size": 8, "positions": "generation", "context": 32}
    t0 = time.perf_counter()
    alone = [log_perplexity(adapter, wins, win_ids, spec=s, **kw) for s in specs]
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shared = log_perplexities(adapter, wins, win_ids, specs, **kw)
    shared_s = time.perf_counter() - t0
    print(
        f"perplexity of {len(wins)} windows ({sum(p.n_tokens for p in shared[:1])} scored "
        f"tokens) under {len(specs)} conditions: alone {alone_s:.1f} s, in one call "
        f"{shared_s:.1f} s"
    )
    for a, s in zip(alone, shared, strict=True):
        if abs(a.log_ppl - s.log_ppl) > 1e-5 * abs(a.log_ppl):
            sys.exit(f"log-perplexity {s.log_ppl} in one call, {a.log_ppl} alone")
    return alone_s, shared_s


if __name__ == "__main__":
    main()
