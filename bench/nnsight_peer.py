"""The same patching condition through nnsight and through dpotox's engine.

    PYTHONPATH=<dir with nnsight> python bench/nnsight_peer.py [--prompts 128] [--neurons 128]

nnsight (``pip install nnsight==0.8.1``; a benchmark-only dependency, not the project's) is the
library a researcher would otherwise reach for. On the embedded model (prepared under
resources/models/smollm2-135m/base by `make run`, loaded offline) and the first ``--prompts``
evaluation prompts, both ways run one condition: ``--neurons`` neurons spread over the layers
(``bench/eval_throughput.py``'s ``patch_spec``) set to fixed values at the last prompt position
and every generated one, greedy, 20 new tokens, in batches of ``--batch-size`` prompts:

(a) nnsight: ``TransformersModel.generate`` on the left-padded token ids, the edit written into
    each output projection's input at the last position in every step (``tracer.all()``);
(b) engine: ``dpotox.engine.generate.greedy`` under the spec.

It checks that the continuations agree, and prints tokens per second for both and their
ratio. The reference code's way (HF ``generate`` with a hook, the scorer one text at a time)
is ``bench/eval_throughput.py``. The last line is
``RESULT nnsight_tokens_per_s=<x> engine_tokens_per_s=<y> ratio=<y/x> same=<k>/<n>``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _embedded import MODEL_DIR, embedded_prompts
from eval_throughput import new_rows, patch_spec

from dpotox.engine.generate import greedy


def adapter_eos(model_dir) -> int:
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir).eos_token_id


def nnsight_generate(model_dir, tok, prompts, spec, *, new_tokens: int, batch_size: int):
    """Continuations and seconds through nnsight's generate with the patch written in."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nnsight import TransformersModel

    lm = TransformersModel(
        str(model_dir), task="text-generation", tokenizer=tok, dispatch=True, dtype=torch.float32
    )
    layers = lm.model.layers
    eos = adapter_eos(model_dir)
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch = tok.pad({"input_ids": prompts[s : s + batch_size]}, return_tensors="pt")
        with lm.generate(
            dict(batch), max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        ) as tracer:
            # One occurrence per forward pass: the prompt, then each new token but the last.
            # A bounded loop, so that the line after it runs (unless every row of the batch
            # ended early, which the check below reports).
            for _ in tracer.iter[:new_tokens]:
                for e in spec.edits:
                    layers[e.layer].mlp.down_proj.input[:, -1, e.neurons] = e.values
            ids = tracer.result.save()
        out += new_rows(ids, batch["input_ids"].shape[1], eos)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--neurons", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=20)
    args = ap.parse_args()
    adapter, tok, prompts, ids = embedded_prompts(MODEL_DIR, args.prompts)
    spec = patch_spec(adapter, args.neurons)
    print(
        f"{len(prompts)} prompts, {args.neurons} patched neurons, {args.new_tokens} new tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    ref, ref_s = nnsight_generate(
        MODEL_DIR, tok, prompts, spec, new_tokens=args.new_tokens, batch_size=args.batch_size
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
    eng_s = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ref, gen.new_tokens, strict=True))
    n_tok = gen.n_new_tokens
    ref_tps, eng_tps = sum(map(len, ref)) / ref_s, n_tok / eng_s
    print(f"identical continuations: {same}/{len(prompts)}")
    print(f"nnsight: {ref_s:.2f} s, {ref_tps:.1f} tokens/s")
    print(f"engine:  {eng_s:.2f} s, {eng_tps:.1f} tokens/s")
    print(
        f"RESULT nnsight_tokens_per_s={ref_tps:.1f} engine_tokens_per_s={eng_tps:.1f} "
        f"ratio={eng_tps / ref_tps:.2f} same={same}/{len(prompts)}"
    )
    if same != len(prompts):
        raise SystemExit("FAILED: nnsight's continuations differ from the engine's")


if __name__ == "__main__":
    main()
