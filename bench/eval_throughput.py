"""Throughput of one evaluated condition: the reference code's way against the engine.

    python bench/eval_throughput.py [--prompts 256] [--neurons 128] [--batch-size 32]

Both ways evaluate one condition, a patching spec that sets 128 neurons (the top ones of a
random draw over layers) to fixed values at the last prompt position and every generated
one, on the embedded model (prepared under resources/models/smollm2-135m/base by `make run`):

(a) reference: Hugging Face ``generate`` in batches of the prompts in their given order, with a
    forward pre-hook registered for the condition that patches the last position of every
    call, and the toxicity scorer called on one text at a time;
(b) engine: ``dpotox.engine.generate.greedy`` under the spec, and the scorer called in batches.

It checks the continuations are identical, prints tokens per second for both and their ratio,
and the engine's model FLOP rate (``dpotox.engine.flops``; lm_head included, padding not) as a
fraction of this machine's fp32 GEMM rate measured in the same run, for generation and for
perplexity. The GEMM rate is the sustained one (a 3 s loop of 2048^3 GEMMs, before and after,
averaged): a job of minutes gets that, not the peak of one GEMM, which is printed beside it.
Denormals are flushed to zero for both ways, as the evaluate rule does.
The last line is ``RESULT ratio=<x> gemm_fraction=<generation> ppl_gemm_fraction=<y>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from dpotox.engine.arch import Adapter
from dpotox.engine.flops import forward_flops, gemm_rate, generation_contexts
from dpotox.engine.generate import encode_prompts, flush_denormals, greedy
from dpotox.engine.metrics import log_perplexity, windows
from dpotox.engine.spec import Intervention, SetNeurons
from dpotox.scoring import load_scorer
from dpotox.sources import load_prepared

REPO = Path(__file__).resolve().parents[1]


def patch_spec(adapter: Adapter, n: int, seed: int = 0) -> Intervention:
    """``n`` neurons spread over layers, set to values of the size activations have."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(adapter.n_layers * adapter.d_mlp, generator=g)[:n]
    edits = []
    for layer in range(adapter.n_layers):
        idx = (flat[flat // adapter.d_mlp == layer] % adapter.d_mlp).sort().values
        if idx.numel():
            edits.append(SetNeurons(layer, idx, torch.randn(idx.numel(), generator=g) * 0.1))
    return Intervention(f"patch-{n}", edits, f"{n} random neurons set to fixed values")


def new_rows(gen: torch.Tensor, prompt_width: int, eos: int) -> list[list[int]]:
    """Each row's generated ids after the (left-padded) prompt, up to and including EOS."""
    out = []
    for row in gen[:, prompt_width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        out.append(row[:cut])
    return out


def reference(
    adapter: Adapter,
    tok,
    prompts: list[list[int]],
    spec: Intervention,
    *,
    new_tokens: int,
    batch_size: int,
    scorer,
) -> tuple[list[list[int]], list[float], float, float]:
    """HF generate + a per-condition hook on the last position; the scorer one text at a time."""
    model = adapter.model
    handles = []
    for e in spec.edits:

        def hook(mod, args, idx=e.neurons, vals=e.values):
            m = args[0]
            m[:, -1, idx] = vals
            return (m,)

        handles.append(adapter.out_proj(e.layer).register_forward_pre_hook(hook))
    eos = model.generation_config.eos_token_id
    out: list[list[int]] = []
    t0 = time.perf_counter()
    try:
        for s in range(0, len(prompts), batch_size):
            batch = tok.pad(
                {"input_ids": prompts[s : s + batch_size]}, return_tensors="pt", padding=True
            )
            with torch.no_grad():
                gen = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            out += new_rows(gen, batch["input_ids"].shape[1], eos)
    finally:
        for h in handles:
            h.remove()
    t_gen = time.perf_counter() - t0
    texts = tok.batch_decode(out, skip_special_tokens=True)
    scores = [float(scorer.score([t])[0]) for t in texts]
    return out, scores, t_gen, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "resources/models/smollm2-135m/base"))
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--neurons", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--ppl-texts", type=int, default=64)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print where the engine's time goes (torch profiler, by op and shape)",
    )
    args = ap.parse_args()
    flush_denormals()

    model, tok = load_prepared(args.model_dir)
    adapter = Adapter(model)
    table = pd.read_parquet(REPO / "resources/data/prompts.parquet").head(args.prompts)
    ids = table["id"].tolist()
    prompts = encode_prompts(tok, table["text"].tolist(), ids, max_tokens=32)
    spec = patch_spec(adapter, args.neurons)
    scorer = load_scorer({"scorer": "jigsaw-bilstm", "batch_size": 64})
    print(
        f"model {args.model_dir}: {adapter.n_layers} layers, d_mlp {adapter.d_mlp}; "
        f"{len(prompts)} prompts, {args.new_tokens} new tokens, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )

    gemm = gemm_rate()
    print(
        f"fp32 GEMM rate (2048^3): sustained {gemm.sustained / 1e9:.1f} GFLOP/s over 3 s, "
        f"peak {gemm.peak / 1e9:.1f} GFLOP/s (one GEMM)"
    )

    ref_tokens, ref_scores, ref_gen_s, ref_s = reference(
        adapter,
        tok,
        prompts,
        spec,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        scorer=scorer,
    )
    t0 = time.perf_counter()
    gen = greedy(
        adapter,
        tok,
        prompts,
        ids,
        spec=spec,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
    )
    scores = scorer.score(gen.texts)
    eng_s = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ref_tokens, gen.new_tokens))
    max_diff = max(abs(a - b) for a, b in zip(ref_scores, scores))
    print(
        f"identical continuations: {same}/{len(prompts)}; max score difference "
        f"(one at a time vs batched) {max_diff:.2e}"
    )
    if same != len(prompts):
        raise SystemExit("FAILED: the engine's continuations differ from the reference's")

    after = gemm_rate()
    rate = (gemm.sustained + after.sustained) / 2
    peak = max(gemm.peak, after.peak)
    print(
        f"fp32 GEMM rate again: sustained {after.sustained / 1e9:.1f} GFLOP/s; fractions "
        f"below are of the mean sustained rate, {rate / 1e9:.1f} GFLOP/s (of the peak, "
        f"{peak / 1e9:.1f} GFLOP/s, in brackets)"
    )
    n_tok = gen.n_new_tokens
    ref_tps, eng_tps = n_tok / ref_s, n_tok / eng_s
    print(
        f"reference: {ref_s:.2f} s ({ref_gen_s:.2f} s generate, {ref_s - ref_gen_s:.2f} s "
        f"scoring one by one): {ref_tps:.1f} tokens/s"
    )
    print(
        f"engine:    {eng_s:.2f} s ({gen.seconds:.2f} s generate, {eng_s - gen.seconds:.2f} s "
        f"scoring batched): {eng_tps:.1f} tokens/s"
    )
    flops = forward_flops(
        adapter,
        generation_contexts(map(len, prompts), map(len, gen.new_tokens)),
        logit_tokens=n_tok,
    )
    gen_frac = flops / gen.seconds / rate
    print(
        f"generation: {flops / 1e9:.1f} GFLOP in {gen.seconds:.2f} s = "
        f"{flops / gen.seconds / 1e9:.1f} GFLOP/s = {gen_frac:.2f} of GEMM rate "
        f"[{flops / gen.seconds / peak:.2f}] (reference generate: "
        f"{flops / ref_gen_s / rate:.2f} [{flops / ref_gen_s / peak:.2f}])"
    )

    wiki = pd.read_parquet(REPO / "resources/data/wiki.parquet").head(args.ppl_texts)
    win_ids, wins = windows(tok, wiki["text"].tolist(), wiki["id"].tolist(), 256)
    ppl = log_perplexity(adapter, wins, win_ids, spec=spec, batch_size=8)
    ppl_flops = forward_flops(
        adapter, [c for w in wins for c in range(1, len(w) + 1)], logit_tokens=sum(map(len, wins))
    )
    ppl_frac = ppl_flops / ppl.seconds / rate
    print(
        f"perplexity: {len(wins)} windows, {ppl.n_tokens} predicted tokens, log-PPL "
        f"{ppl.log_ppl:.3f}; {ppl_flops / 1e9:.1f} GFLOP in {ppl.seconds:.2f} s = "
        f"{ppl_frac:.2f} of GEMM rate [{ppl_flops / ppl.seconds / peak:.2f}]"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for what, run in (
            (
                "generation",
                lambda: greedy(
                    adapter,
                    tok,
                    prompts,
                    ids,
                    spec=spec,
                    new_tokens=args.new_tokens,
                    batch_size=args.batch_size,
                ),
            ),
            ("perplexity", lambda: log_perplexity(adapter, wins, win_ids, spec=spec, batch_size=8)),
        ):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                run()
            print(f"where the engine's {what} time goes (self CPU time by op and input shape):")
            print(
                prof.key_averages(group_by_input_shape=True).table(
                    sort_by="self_cpu_time_total",
                    row_limit=15,
                    max_name_column_width=36,
                    max_shapes_column_width=48,
                )
            )
    print(
        f"RESULT ratio={eng_tps / ref_tps:.2f} gemm_fraction={gen_frac:.2f} "
        f"ppl_gemm_fraction={ppl_frac:.2f}"
    )


if __name__ == "__main__":
    main()
