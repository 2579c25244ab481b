"""Time of activation caching over plain greedy generation of the same prompts.

    python bench/cache_overhead.py [--prompts 256] [--batch-size 128] [--repeats 1]

On the embedded model, generates 20 greedy tokens for the first ``--prompts`` prompts twice per
repeat, alternating: plain (``dpotox.engine.generate.greedy``), and with every layer's activations
cached to Parquet (``dpotox.stages.activations.cache_generation``, including the writing).
Checks the
tokens are the same and prints both times (the best of the repeats) and their ratio.
Target: at most 1.2. The last line is ``RESULT plain_s=<a> cache_s=<b> ratio=<b/a>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import MODEL_DIR, embedded_prompts


def main() -> None:
    from dpotox.engine.generate import greedy
    from dpotox.stages.activations import cache_generation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    args = ap.parse_args()
    adapter, tok, prompts, ids = embedded_prompts(args.model_dir, args.prompts)
    print(
        f"{len(prompts)} prompts, 20 new tokens, batch {args.batch_size}, "
        f"{adapter.n_layers} layers x {adapter.d_mlp} neurons, {torch.get_num_threads()} threads"
    )
    greedy(adapter, tok, prompts[:8], ids[:8], new_tokens=4)  # warm up kernels and allocator
    plain, cached = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            t0 = time.perf_counter()
            ref = greedy(adapter, tok, prompts, ids, new_tokens=20, batch_size=args.batch_size)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gen, _ = cache_generation(
                adapter,
                tok,
                prompts,
                ids,
                Path(tmp) / f"c{r}",
                new_tokens=20,
                batch_size=args.batch_size,
            )
            cached.append(time.perf_counter() - t0)
            if gen.new_tokens != ref.new_tokens:
                sys.exit("caching changed the generated tokens")
            print(
                f"repeat {r}: plain {plain[-1]:.1f} s, caching {cached[-1]:.1f} s "
                f"({gen.n_new_tokens} tokens)"
            )
    a, b = min(plain), min(cached)
    print(f"RESULT plain_s={a:.2f} cache_s={b:.2f} ratio={b / a:.3f}")


if __name__ == "__main__":
    main()
