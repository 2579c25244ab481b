"""Batched generation under an intervention (greedy or sampled), with left padding and the KV cache.

Prompts are tokenised with the tokenizer's own special tokens (BOS where the model expects
one) and cut to their first ``prompt_tokens`` tokens. A batch is left-padded, so every row's
last prompt token sits at the last position: the one forward pass over the prompts (prefill)
applies ``generation`` edits there, and every later step feeds one new token per row through
the KV cache (allocated once per batch), where every edit applies. Rows are sorted by length before batching (less
padding); results come back in the caller's order. Decoding is greedy (argmax; ties go to the
lowest token id) or, with a temperature, sampled from the softmax of ``logits / temperature``
with a seeded generator (same prompts, seed and batch size: same samples). A row that emits an
end-of-sequence token is finished and pads from then on, as Hugging Face ``generate`` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StaticCache

from dpotox.arch import Adapter
from dpotox.errors import DpotoxError
from dpotox.interventions import Intervention, Recorder, applied
from dpotox.sources.models import resolve_device


class PromptError(DpotoxError, ValueError):
    """A prompt that cannot be generated from; the message names it by id."""


@dataclass
class Generation:
    """Continuations of a list of prompts, in the order the prompts were given."""

    ids: list[str]
    prompt_tokens: list[list[int]]
    new_tokens: list[list[int]]  # up to and including an end-of-sequence token, if one came
    texts: list[str]  # decoded continuations, special tokens removed
    seconds: float

    @property
    def n_prompt_tokens(self) -> int:
        return sum(map(len, self.prompt_tokens))

    @property
    def n_new_tokens(self) -> int:
        return sum(map(len, self.new_tokens))


def encode_prompts(tok: PreTrainedTokenizerBase, texts: Sequence[str], ids: Sequence[str], *,
                   max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, cut to its first ``max_tokens`` tokens.

    Raises:
        PromptError: an empty prompt, one that is not valid text (lone surrogates from
            invalid UTF-8), or one with no token besides special tokens; the message names its id.
    """
    special = set(tok.all_special_ids)
    out = []
    for pid, text in zip(ids, texts, strict=True):
        if not isinstance(text, str):
            raise PromptError(f"prompt {pid!r} is not text ({type(text).__name__})")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"prompt {pid!r} is not valid UTF-8 text ({e.reason} at "
                              f"character {e.start}); fix or drop it in the source") from None
        if not text.strip():
            raise PromptError(f"prompt {pid!r} is empty; drop it from the prompts source")
        tokens = tok(text, add_special_tokens=True)["input_ids"]
        if not any(t not in special for t in tokens):
            raise PromptError(f"prompt {pid!r} ({text[:40]!r}) tokenises to nothing but special "
                              "tokens; drop it from the prompts source")
        out.append(tokens[:max_tokens])
    return out


def flush_denormals() -> bool:
    """Flush denormal floats to zero on this CPU (process-wide); True if supported.

    SiLU and GELU tails and softmax produce denormals (below 1.2e-38 in float32), and x86
    arithmetic on them is many times slower: flushing them doubles prefill speed on the
    embedded model, at a cost below float32 resolution for every value that matters.
    """
    return torch.set_flush_denormal(True)


def inference_device(device: str) -> str:
    """The device a stage runs its model on (``auto`` resolved); on a CPU, denormals are
    flushed first (see :func:`flush_denormals`)."""
    device = resolve_device(device)
    if device == "cpu":
        flush_denormals()
    return device


def eos_ids(model: torch.nn.Module, tok: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a continuation: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of rows padded on the left to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def balanced_batch_size(n: int, batch_size: int) -> int:
    """The smallest size that needs as few batches as ``batch_size`` does (160 by 128: 80, 80)."""
    if n == 0:
        return batch_size
    n_batches = -(-n // batch_size)
    return -(-n // n_batches)


def greedy(adapter: Adapter, tok: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
           ids: Sequence[str], *, spec: Intervention | None = None, new_tokens: int = 20,
           batch_size: int = 32, sort: bool = True,
           recorder: Recorder | None = None) -> Generation:
    """Greedy continuations of tokenised ``prompts`` under ``spec`` (see :func:`generate`)."""
    return generate(adapter, tok, prompts, ids, spec=spec, new_tokens=new_tokens,
                    batch_size=batch_size, sort=sort, recorder=recorder)


@torch.inference_mode()
def generate(adapter: Adapter, tok: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
             ids: Sequence[str], *, spec: Intervention | None = None, new_tokens: int = 20,
             batch_size: int = 32, sort: bool = True, temperature: float = 0.0,
             seed: int = 0, recorder: Recorder | None = None) -> Generation:
    """Continuations of tokenised ``prompts`` under ``spec``.

    Args:
        adapter: the model to run (its hooks are added and removed here).
        prompts: token ids per prompt (see :func:`encode_prompts`).
        ids: one id per prompt; per-prompt edits look their values up by these.
        new_tokens: how many tokens to generate at most.
        batch_size: prompts per forward pass.
        sort: batch prompts of similar length together (less padding, same tokens).
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        seed: seeds the sampling generator (unused when greedy).
        recorder: reads every layer's activations at the positions that produce the kept
            tokens (``ctx.active`` marks the rows still generating); see ``dpotox.activations``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    model = adapter.model
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = eos_ids(model, tok)
    stop = torch.tensor(stops, device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if sort else list(range(len(prompts)))
    batch_size = balanced_batch_size(len(order), batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    t0 = time.perf_counter()
    with applied(adapter, spec, prompt_ids=list(ids), recorder=recorder) as ctx:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, mask = left_pad([prompts[i] for i in rows], pad, device)
            # Left padding shifts each row; positions count real tokens only.
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            ctx.prompt_ids = [ids[i] for i in rows]
            ctx.phase = "prefill"
            ctx.active = torch.ones(len(rows), dtype=torch.bool, device=device)
            if recorder is not None:
                recorder.start(ctx)
            width = input_ids.shape[1]
            # A cache allocated once for the whole continuation: a growing one copies every
            # layer's keys and values at each step (a tenth of the time at batch 128 on CPU).
            cache = StaticCache(config=model.config, max_cache_len=width + new_tokens)
            res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                        past_key_values=cache, cache_position=torch.arange(width, device=device),
                        use_cache=True, logits_to_keep=1)
            ctx.phase = "decode"
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            generated = []
            last = pos[:, -1:]
            for step in range(new_tokens):
                logits = res.logits[:, -1]
                if rng is None:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=rng)[:, 0]
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                generated.append(nxt)
                done |= torch.isin(nxt, stop)
                if step == new_tokens - 1 or bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last = last + 1
                # A finished row's next position produces only padding: not a kept token.
                ctx.active = ~done
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last,
                            past_key_values=cache,
                            cache_position=torch.tensor([width + step], device=device),
                            use_cache=True, logits_to_keep=1)
            if recorder is not None:
                recorder.finish(ctx)
            gen = torch.stack(generated, dim=1).tolist()
            for row, toks in zip(rows, gen, strict=True):
                # Keep tokens up to and including the first end-of-sequence token.
                cut = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
                out[row] = toks[:cut]
            # Free this batch's key-value cache before the next batch allocates its own: held
            # over, two caches (300 MB each for the embedded model at batch 128) coexist.
            del res, cache
    seconds = time.perf_counter() - t0
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return Generation(list(ids), [list(p) for p in prompts], out, texts, seconds)
