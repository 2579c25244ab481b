"""Best-of-n pair sampling: each prompt prefilled n times against once, and the sampler.

    python bench/pair_sampling.py [--model smollm2-135m] [--prompts 64] [--samples 4]

On a prepared model (``resources/models/<model>/base``, written by `make run`, or by
`snakemake --profile profiles/local --configfile config/config.yaml config/two-models.yaml
resources/models/gemma3-270m/base` for Gemma-3) and the first ``--prompts`` prompts, with
``dpo.pairs``' defaults (32 prompt tokens, 24 new tokens, temperature 1, 128 rows a batch):

(a) replicated: every prompt repeated n times and each copy prefilled, as the pairs stage
    did before (rows sample-major, so that both ways draw the same numbers);
(b) shared: each prompt prefilled once, its n continuations sampled from the repeated
    key-value cache (``generate(..., n_samples=n)``, what the stage does now).

It checks that both give the same tokens, and prints continuation tokens per second for both
and their ratio. It also times one sampling step at the model's vocabulary on 128 rows:
``torch.multinomial`` (an exponential variate per vocabulary entry) against the engine's
inverse-transform ``sample``. The last line is
``RESULT shared_tokens_per_s=<x> replicated_tokens_per_s=<y> ratio=<x/y> multinomial_ms=<a>
sample_ms=<b>``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _embedded import REPO, embedded_prompts

from dpotox.engine.generate import generate, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    adapter, tok, prompts, ids = embedded_prompts(
        REPO / "resources/models" / args.model / "base", args.prompts
    )
    n, rows = args.samples, args.batch_size
    kw = dict(new_tokens=args.new_tokens, temperature=1.0, seed=0, sort=False)
    # One batch of prompts per call in both ways, so both draw from the same seeded stream.
    per = max(1, rows // n)
    tokens = {"shared": [], "replicated": []}
    secs = {"shared": 0.0, "replicated": 0.0}
    for start in range(0, len(prompts), per):
        p, i = prompts[start : start + per], ids[start : start + per]
        t = time.perf_counter()
        shared = generate(adapter, tok, p, i, n_samples=n, batch_size=len(p) * n, **kw)
        secs["shared"] += time.perf_counter() - t
        t = time.perf_counter()
        rep = generate(adapter, tok, p * n, i * n, batch_size=len(p) * n, **kw)
        secs["replicated"] += time.perf_counter() - t
        tokens["shared"] += shared.new_tokens
        tokens["replicated"] += [
            rep.new_tokens[k * len(p) + j] for j in range(len(p)) for k in range(n)
        ]
    same = tokens["shared"] == tokens["replicated"]
    n_tok = sum(map(len, tokens["shared"]))
    rate = {k: n_tok / v for k, v in secs.items()}
    print(
        f"{args.model}: {len(prompts)} prompts x {n} samples, {n_tok} tokens; same tokens: {same}"
    )
    for k in ("replicated", "shared"):
        print(f"  {k:10s} {secs[k]:7.1f} s  {rate[k]:7.1f} tokens/s")

    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    ms = {}
    for name, fn in (
        (
            "multinomial",
            lambda g: torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0],
        ),
        ("sample", lambda g: sample(logits, 1.0, g)),
    ):
        g = torch.Generator().manual_seed(0)
        fn(g)
        t = time.perf_counter()
        for _ in range(5):
            fn(g)
        ms[name] = (time.perf_counter() - t) / 5 * 1e3
    print(
        f"  one sampling step, {rows} rows x {vocab} tokens: "
        f"multinomial {ms['multinomial']:.1f} ms, sample {ms['sample']:.1f} ms"
    )
    if not same:
        raise SystemExit("the shared prefill changed the samples")
    print(
        f"RESULT shared_tokens_per_s={rate['shared']:.1f} "
        f"replicated_tokens_per_s={rate['replicated']:.1f} "
        f"ratio={rate['shared'] / rate['replicated']:.2f} "
        f"multinomial_ms={ms['multinomial']:.1f} sample_ms={ms['sample']:.1f}"
    )


if __name__ == "__main__":
    main()
