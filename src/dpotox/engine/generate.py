"""Batched generation under an intervention (greedy or sampled), with left padding and the KV cache.

Prompts are tokenised with the tokenizer's own special tokens (BOS where the model expects
one) and cut to their first ``prompt_tokens`` tokens. A batch is left-padded, so every row's
last prompt token sits at the last position. One forward pass runs the prefix (every prompt
token but the last; ``generation`` edits do not act there), one the last prompt token, and
every later step feeds one new token per row through the KV cache (allocated once per batch);
edits act on all of these. Conditions that differ only from the last prompt token on share
the prefix pass (:func:`generate_many`). Rows are sorted by length before batching (less
padding); results come back in the caller's order. Decoding is greedy (argmax; ties go to the
lowest token id) or, with a temperature, sampled from the softmax of ``logits / temperature``
by inverse transform (one uniform draw per row against the row's cumulative distribution),
with a generator seeded per batch (same prompts, seed and batch size: same samples).
``torch.multinomial`` draws an exponential variate for every vocabulary entry of every row
instead: with Gemma-3's 262,144 tokens that took more time than the model's forward pass.
Several samples of one prompt (``n_samples``) share its prefill: the prefix runs once and its
key-value cache is repeated, one block of rows per sample. A row that emits an
end-of-sequence token is finished and pads from then on, as Hugging Face ``generate`` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StaticCache

from dpotox.engine.arch import Adapter
from dpotox.engine.hooks import Context, Hooks, Recorder
from dpotox.engine.spec import Intervention
from dpotox.errors import DpotoxError
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


def encode_prompts(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], ids: Sequence[str], *, max_tokens: int
) -> list[list[int]]:
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
            raise PromptError(
                f"prompt {pid!r} is not valid UTF-8 text ({e.reason} at "
                f"character {e.start}); fix or drop it in the source"
            ) from None
        if not text.strip():
            raise PromptError(f"prompt {pid!r} is empty; drop it from the prompts source")
        tokens = tok(text, add_special_tokens=True)["input_ids"]
        if not any(t not in special for t in tokens):
            raise PromptError(
                f"prompt {pid!r} ({text[:40]!r}) tokenises to nothing but special "
                "tokens; drop it from the prompts source"
            )
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


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of rows padded on the left to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.as_tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def balanced_batch_size(n: int, batch_size: int) -> int:
    """The smallest size that needs as few batches as ``batch_size`` does (160 by 128: 80, 80)."""
    if n == 0:
        return batch_size
    n_batches = -(-n // batch_size)
    return -(-n // n_batches)


def greedy(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    *,
    spec: Intervention | None = None,
    new_tokens: int = 20,
    batch_size: int = 32,
    sort: bool = True,
    recorder: Recorder | None = None,
) -> Generation:
    """Greedy continuations of tokenised ``prompts`` under ``spec`` (see :func:`generate`)."""
    return generate(
        adapter,
        tok,
        prompts,
        ids,
        spec=spec,
        new_tokens=new_tokens,
        batch_size=batch_size,
        sort=sort,
        recorder=recorder,
    )


def generate(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    *,
    spec: Intervention | None = None,
    new_tokens: int = 20,
    batch_size: int = 32,
    sort: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    n_samples: int = 1,
    recorder: Recorder | None = None,
) -> Generation:
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
        n_samples: continuations per prompt, sampled from one prefill of the prompt (needs a
            temperature); the result then has ``n_samples`` rows per prompt, consecutive,
            each with the prompt's id, and ``batch_size`` counts rows, not prompts.
        recorder: reads every layer's activations at the positions that produce the kept
            tokens (``ctx.active`` marks the rows still generating); see
            ``dpotox.stages.activations``.
    """
    return generate_many(
        adapter,
        tok,
        prompts,
        ids,
        [spec],
        new_tokens=new_tokens,
        batch_size=batch_size,
        sort=sort,
        temperature=temperature,
        seed=seed,
        n_samples=n_samples,
        recorder=recorder,
    )[0]


@torch.inference_mode()
def generate_many(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    specs: Sequence[Intervention | None],
    *,
    new_tokens: int = 20,
    batch_size: int = 32,
    sort: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    n_samples: int = 1,
    recorder: Recorder | None = None,
    stack_rows: int = 512,
) -> list[Generation]:
    """Continuations of the same prompts under each of ``specs`` (arguments: :func:`generate`).

    Each batch of prompts runs in two steps: the prefix (every prompt token but the last),
    then the last prompt token, after which the decoding steps follow. Specs that leave the
    prefix untouched (:attr:`Intervention.shares_prefix`: every edit at the generation
    positions) share one prefill of the prefix, and are decoded stacked: up to
    ``stack_rows // batch`` conditions side by side in one batch, each edit acting on its own
    condition's rows, so that one pass over the weights serves several conditions. Other
    specs prefill their own prefix and decode alone. Each spec gets the tokens it gets alone
    (a single spec takes the same two steps with the same prompt batches; tested).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    if recorder is not None and len(specs) != 1:
        raise ValueError("a recorder reads one condition; give one spec")
    if n_samples < 1 or (n_samples > 1 and temperature == 0):
        raise ValueError(
            f"n_samples must be 1, or above 1 with a temperature (greedy samples are all the "
            f"same), not {n_samples} at temperature {temperature}"
        )
    if n_samples > 1 and (recorder is not None or not all(shares_prefix(s) for s in specs)):
        raise ValueError(
            "several samples share one prefill: give specs that leave the prefix unedited, "
            "and no recorder"
        )
    model = adapter.model
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = eos_ids(model, tok)
    stop = torch.tensor(stops, device=device)
    order = (
        sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        if sort
        else list(range(len(prompts)))
    )
    batch_size = balanced_batch_size(len(order), max(1, batch_size // n_samples))
    stacks = _stacks(specs, min(batch_size, len(order)), stack_rows, temperature)
    # Hooks are checked and moved to the device once, and attached per batch.
    ctx = Context(prompt_ids=list(ids))
    hooks = [
        Hooks(adapter, spec, prompt_ids=list(ids), recorder=recorder, ctx=ctx) for spec in specs
    ]
    outs: list[list[list[int]]] = [[[] for _ in range(len(prompts) * n_samples)] for _ in specs]
    seconds = [0.0] * len(specs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        n = len(rows)
        input_ids, mask = left_pad([prompts[i] for i in rows], pad, device)
        # Left padding shifts each row; positions count real tokens only.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        width = input_ids.shape[1]
        ctx.prompt_ids = [ids[i] for i in rows] * n_samples
        shared = None
        for stack in stacks:
            t0 = time.perf_counter()
            # Blocks of n rows: one per stacked condition, or one per sample (never both:
            # sampling does not stack).
            k = len(stack) * n_samples
            # A cache allocated once for the whole continuation: a growing one copies every
            # layer's keys and values at each step (a tenth of the time at batch 128 on CPU).
            cache = StaticCache(config=model.config, max_cache_len=width + new_tokens)
            sharing = shares_prefix(specs[stack[0]])
            if shared is not None and sharing:
                restore(cache, shared, repeat=k)
            else:
                _prefill_prefix(
                    model, ctx, cache, input_ids, mask, pos, None if sharing else hooks[stack[0]]
                )
                if sharing:
                    shared = snapshot(cache)
                    if k > 1:
                        restore(cache, shared, repeat=k)
            with ExitStack() as es:
                for block, j in enumerate(stack):
                    hooks[j].restrict(
                        slice(block * n, (block + 1) * n) if len(stack) > 1 else slice(None)
                    )
                    es.enter_context(hooks[j].attached())
                rng = (
                    torch.Generator(device=device).manual_seed(seed + start)
                    if temperature > 0
                    else None
                )
                gen = _continue(
                    model,
                    ctx,
                    cache,
                    input_ids[:, -1:].repeat(k, 1),
                    mask.repeat(k, 1),
                    pos[:, -1:].repeat(k, 1),
                    width,
                    new_tokens=new_tokens,
                    pad=pad,
                    stop=stop,
                    rng=rng,
                    temperature=temperature,
                    recorder=recorder,
                )
            for block, j in enumerate(stack):
                for sample in range(n_samples):
                    first = (block * n_samples + sample) * n
                    for row, toks in zip(rows, gen[first : first + n], strict=True):
                        outs[j][row * n_samples + sample] = _until_stop(toks, stops)
                seconds[j] += (time.perf_counter() - t0) / len(stack)
            # Free the key-value cache before the next allocates its own: held over, two
            # caches (300 MB each for the embedded model at batch 128) coexist.
            del cache
        del shared
    for h in hooks:
        h.restrict(slice(None))
    return [
        Generation(
            [pid for pid in ids for _ in range(n_samples)],
            [list(p) for p in prompts for _ in range(n_samples)],
            out,
            tok.batch_decode(out, skip_special_tokens=True),
            secs,
        )
        for out, secs in zip(outs, seconds, strict=True)
    ]


def sample(
    logits: torch.Tensor, temperature: float, rng: torch.Generator, *, block: int = 1024
) -> torch.Tensor:
    """One token per row of ``logits`` (rows x vocabulary), drawn from the softmax of
    ``logits / temperature`` by inverse transform: the first token whose cumulative
    probability exceeds a uniform draw scaled to the row's total.

    The cumulative sum runs in two levels: over blocks of ``block`` tokens to find the block
    the draw falls in, then within that block only, since a float64 cumulative sum over the
    whole vocabulary is slow sequential work on every entry. At 128 rows and Gemma-3's
    262,144 tokens a step takes about a tenth of ``torch.multinomial``'s 1.2 s
    (``bench/pair_sampling.py``).
    """
    # Each pass over rows x vocabulary costs about 50 ms at Gemma-3's size (memory-bound), so
    # the passes are few: one softmax (fused), one float32 block sum.
    z = logits.float()
    probs = torch.softmax(z if temperature == 1 else z / temperature, dim=-1)
    rows, vocab = probs.shape
    n_blocks = -(-vocab // block)
    if n_blocks * block != vocab:
        probs = torch.nn.functional.pad(probs, (0, n_blocks * block - vocab))
    blocks = probs.view(rows, n_blocks, block)
    # The block sums' float32 rounding (about 1e-7 of a block's mass) shifts a draw by far
    # less than one token's share; the cumulative sums run in float64.
    outer = blocks.sum(-1).double().cumsum(-1)
    u = torch.rand((rows, 1), generator=rng, device=probs.device, dtype=torch.float64)
    u = u * outer[:, -1:]
    j = torch.searchsorted(outer, u, right=True).clamp(max=n_blocks - 1)
    before = torch.where(j > 0, outer.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks[torch.arange(rows, device=probs.device), j[:, 0]].double().cumsum(-1)
    # Rounding can leave the remainder a hair above the block's own sum: keep it inside, so
    # that a token of zero probability (after the block's last real one) is never drawn.
    rest = torch.minimum(u - before, inner[:, -1:] * (1 - 1e-12))
    k = torch.searchsorted(inner, rest, right=True).clamp(max=block - 1)
    return (j[:, 0] * block + k[:, 0]).clamp(max=vocab - 1)


def _stacks(
    specs: Sequence[Intervention | None], batch: int, stack_rows: int, temperature: float
) -> list[list[int]]:
    """Which specs decode together: stacks of those that share the prompt prefix, up to
    ``stack_rows`` rows each; every other spec alone."""
    sharing = [j for j, s in enumerate(specs) if shares_prefix(s)]
    # Sampling draws per batch from one generator: stacked rows would draw other numbers.
    per_stack = max(1, stack_rows // max(1, batch)) if temperature == 0 else 1
    stacks = [sharing[i : i + per_stack] for i in range(0, len(sharing), per_stack)]
    return stacks + [[j] for j, s in enumerate(specs) if not shares_prefix(s)]


def _prefill_prefix(
    model: torch.nn.Module,
    ctx: Context,
    cache: StaticCache,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    hooks: Hooks | None,
) -> None:
    """Run every prompt token but the last into ``cache`` (under ``hooks``, if the spec does
    not share the prefix)."""
    ctx.phase = "prefix"
    width = input_ids.shape[1]
    with ExitStack() as es:
        if hooks is not None:
            es.enter_context(hooks.attached())
        if width > 1:
            model(
                input_ids=input_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=pos[:, :-1],
                past_key_values=cache,
                cache_position=torch.arange(width - 1, device=input_ids.device),
                use_cache=True,
                logits_to_keep=1,
            )


def _until_stop(toks: list[int], stops: Sequence[int]) -> list[int]:
    """Tokens up to and including the first end-of-sequence token."""
    cut = next((i + 1 for i, t in enumerate(toks) if t in stops), len(toks))
    return toks[:cut]


def shares_prefix(spec: Intervention | None) -> bool:
    """True if ``spec`` leaves the prompt's prefix unedited (no spec does too): conditions that
    do share one prefill of it, here and in the generation-like perplexity."""
    return spec is None or spec.shares_prefix


def snapshot(cache: StaticCache) -> list[dict[str, object]]:
    """A copy of every cache layer's state (tensors cloned): the cache layers keep their own
    write position, so a cache is set to "after the prefix" by its state, not by positions."""
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(layer).items()}
        for layer in cache.layers
    ]


def restore(cache: StaticCache, snapshot: list[dict[str, object]], *, repeat: int = 1) -> None:
    """Set ``cache`` to a :func:`snapshot`, its batch rows repeated ``repeat`` times (one
    block per stacked condition)."""
    for layer, state in zip(cache.layers, snapshot, strict=True):
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                v = v.repeat(repeat, *([1] * (v.dim() - 1))) if v.dim() == 4 else v.clone()
            setattr(layer, k, v)


def _continue(
    model: torch.nn.Module,
    ctx: Context,
    cache: StaticCache,
    last: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    width: int,
    *,
    new_tokens: int,
    pad: int,
    stop: torch.Tensor,
    rng: torch.Generator | None,
    temperature: float,
    recorder: Recorder | None,
) -> list[list[int]]:
    """Feed each row's last prompt token (its prefix is in ``cache``), then decode; returns
    the generated ids per row (finished rows padded)."""
    device = last.device
    ctx.phase = "decode"
    ctx.active = torch.ones(last.shape[0], dtype=torch.bool, device=device)
    if recorder is not None:
        recorder.start(ctx)
    res = model(
        input_ids=last,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        cache_position=torch.tensor([width - 1], device=device),
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(last.shape[0], dtype=torch.bool, device=device)
    generated = []
    for step in range(new_tokens):
        logits = res.logits[:, -1]
        nxt = logits.argmax(-1) if rng is None else sample(logits, temperature, rng)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        generated.append(nxt)
        done |= torch.isin(nxt, stop)
        if step == new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        # A finished row's next position produces only padding: not a kept token.
        ctx.active = ~done
        res = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            cache_position=torch.tensor([width + step], device=device),
            use_cache=True,
            logits_to_keep=1,
        )
    if recorder is not None:
        recorder.finish(ctx)
    return torch.stack(generated, dim=1).tolist()
