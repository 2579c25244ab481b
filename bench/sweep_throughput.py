"""Sweep throughput: 16 conditions evaluated one at a time, and together with shared prefills.

    python bench/sweep_throughput.py [--prompts 160] [--conditions 16] [--batch-size 128]

On the embedded model, generates the evaluation's greedy continuations (20 tokens of the first
``--prompts`` prompts, cut to 32 tokens) under ``--conditions`` intervention specs of the kinds
a sweep runs at the generation positions (ablations, patches, per-prompt patches, activation
edits, built from random neuron sets, since they cost the same as the real ones). First each
condition alone (``dpotox.engine.generate.greedy``, as a job per condition does), then all of
them in one call (``dpotox.engine.generate.generate_many``, as a sweep job does). Checks that
every condition's
tokens are the same both ways and prints both times and their ratio. Target: at least 2. The
last line is ``RESULT alone_s=<a> shared_s=<b> ratio=<a/b>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import MODEL_DIR, embedded_prompts


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
    from dpotox.engine.generate import generate_many, greedy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    args = ap.parse_args()
    adapter, tok, prompts, ids = embedded_prompts(args.model_dir, args.prompts)
    specs = conditions(adapter, ids, args.conditions)
    print(
        f"{len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.1f} tokens), "
        f"20 new tokens, batch {args.batch_size}, {len(specs)} conditions, "
        f"{torch.get_num_threads()} threads"
    )
    greedy(adapter, tok, prompts[:8], ids[:8], new_tokens=4)  # warm up kernels and allocator
    t0 = time.perf_counter()
    alone = [
        greedy(
            adapter, tok, prompts, ids, spec=s, new_tokens=20, batch_size=args.batch_size
        ).new_tokens
        for s in specs
    ]
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shared = generate_many(
        adapter, tok, prompts, ids, specs, new_tokens=20, batch_size=args.batch_size
    )
    shared_s = time.perf_counter() - t0
    same = [g.new_tokens == a for g, a in zip(shared, alone, strict=True)]
    print(
        f"alone: {alone_s:.1f} s ({alone_s / len(specs):.2f} s per condition); "
        f"shared: {shared_s:.1f} s ({shared_s / len(specs):.2f} s per condition); "
        f"identical tokens: {sum(same)}/{len(same)} conditions"
    )
    if not all(same):
        sys.exit("the shared evaluation gave other tokens than evaluating alone")
    print(f"RESULT alone_s={alone_s:.2f} shared_s={shared_s:.2f} ratio={alone_s / shared_s:.3f}")


if __name__ == "__main__":
    main()
