"""The numbers of every condition: toxicity (with a bootstrap CI), log-perplexity, F1, and the
quality of the continuations.

- **Toxicity**: the mean scorer probability over the continuations, with a seeded
  percentile-bootstrap confidence interval over prompts.
- **Log-perplexity**: mean negative log-likelihood (nats per token) of Wikipedia text under the
  intervention. Each text is tokenised on its own (with the tokenizer's special tokens) and,
  if longer than ``window`` tokens, cut into consecutive non-overlapping windows of ``window``
  tokens; every token of a window but its first is predicted from the window's earlier tokens.
  The mean runs over all predicted tokens of all windows. Three placements of the
  intervention: ``positions="all"`` acts at every position; ``"generation"`` as in generation:
  each window's first ``context`` tokens are an unedited, unscored context, activation edits act
  from its last token on and only the tokens after it are scored (windows of ``context`` tokens
  or fewer are left out); ``"first"`` reproduces the reference code, which patched activations
  at position 0 only (and so left perplexity almost unchanged in the papers' Table 2). Edits
  that act everywhere in generation too (steering, value-vector ablation, weight edits) act
  everywhere in all three.
- **F1**: bag-of-tokens F1 (as in SQuAD) between the greedy continuation of a Wikipedia prompt
  and the text's real continuation, on words after lower-casing and removing punctuation and
  the articles a/an/the. Prompts and gold continuations are built by :func:`f1_items`.
- **Quality** (:func:`text_quality`): a broken model can score low toxicity by writing
  nothing, or one word over and over. On the continuations' lower-cased word tokens (``\\w+``,
  as the reference code's repetition metric): distinct-1 and distinct-2 (distinct n-grams over
  all n-grams of all continuations, Li et al. 2016's corpus-level form), the bigram repetition
  of Yang et al. 2025's code (per text ``1 - distinct bigrams / bigrams``, 0 under two words,
  averaged over texts), and the share of empty continuations (no word token).
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, StaticCache

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import restore, shares_prefix, snapshot
from dpotox.engine.hooks import Context, Hooks
from dpotox.engine.spec import Intervention


@dataclass
class MeanCI:
    """A mean with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    level: float


def bootstrap_ci(
    values: Sequence[float], *, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> MeanCI:
    """Mean of ``values`` with a percentile-bootstrap interval (resampling the values, seeded)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return MeanCI(float(x.mean()), float(low), float(high), level)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def words(text: str) -> list[str]:
    """SQuAD normalisation: lower-case, drop punctuation and articles, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def f1(prediction: str, gold: str) -> float:
    """Bag-of-words F1 between two texts (0 when either has no words and they differ)."""
    p, g = words(prediction), words(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_items(
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    prompt_tokens: int,
    new_tokens: int,
    limit: int,
) -> list[tuple[int, list[int], str]]:
    """``(text index, prompt token ids, gold continuation)`` for the first ``limit`` usable texts.

    A text is usable if it has at least ``prompt_tokens + new_tokens`` tokens: its first
    ``prompt_tokens`` tokens are the prompt and the decoded next ``new_tokens`` the gold.
    """
    items = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= prompt_tokens + new_tokens:
            gold = tok.decode(
                ids[prompt_tokens : prompt_tokens + new_tokens], skip_special_tokens=True
            )
            items.append((i, ids[:prompt_tokens], gold))
            if len(items) == limit:
                break
    return items


def windows(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], ids: Sequence[str], window: int
) -> tuple[list[str], list[list[int]]]:
    """``(text id per window, token windows)`` for perplexity (see the module docstring).

    A window of one token predicts nothing and is dropped.
    """
    out_ids, out = [], []
    for tid, text in zip(ids, texts, strict=True):
        tokens = tok(text, add_special_tokens=True)["input_ids"]
        for s in range(0, len(tokens), window):
            if len(tokens[s : s + window]) > 1:
                out_ids.append(tid)
                out.append(tokens[s : s + window])
    return out_ids, out


@dataclass
class Perplexity:
    log_ppl: float  # mean NLL in nats per predicted token
    n_tokens: int  # predicted tokens
    n_windows: int
    seconds: float


@torch.inference_mode()
def log_perplexity(
    adapter: Adapter,
    token_windows: Sequence[Sequence[int]],
    ids: Sequence[str],
    *,
    spec: Intervention | None = None,
    batch_size: int = 8,
    positions: Literal["all", "generation", "first"] = "all",
    context: int = 32,
    pad_id: int = 0,
) -> Perplexity:
    """Mean NLL of ``token_windows`` under ``spec`` (see the module docstring).

    ``ids`` names each window's text, for per-prompt edits; ``context``: the unedited tokens of
    ``positions="generation"``.
    """
    return log_perplexities(
        adapter,
        token_windows,
        ids,
        [spec],
        batch_size=batch_size,
        positions=positions,
        context=context,
        pad_id=pad_id,
    )[0]


@torch.inference_mode()
def log_perplexities(
    adapter: Adapter,
    token_windows: Sequence[Sequence[int]],
    ids: Sequence[str],
    specs: Sequence[Intervention | None],
    *,
    batch_size: int = 8,
    positions: Literal["all", "generation", "first"] = "all",
    context: int = 32,
    pad_id: int = 0,
) -> list[Perplexity]:
    """:func:`log_perplexity` of the same windows under each of ``specs``, in one pass over
    the batches of windows.

    Under ``positions="generation"`` the first ``context - 1`` tokens of every window are the
    same under every spec that leaves a prompt's prefix untouched
    (:attr:`~dpotox.engine.spec.Intervention.shares_prefix`, and no spec): their keys and
    values are computed once per batch of windows, and each such spec runs only the tokens
    from the context's last one on (the numbers of running it alone, up to float rounding;
    tested). Other specs run whole windows.
    """
    model = adapter.model
    device = next(model.parameters()).device
    skip = 0
    if positions == "generation":
        keep = [i for i, w in enumerate(token_windows) if len(w) > context]
        token_windows, ids = [token_windows[i] for i in keep], [ids[i] for i in keep]
        skip = context
        if not token_windows:
            raise ValueError(
                f"no perplexity window is longer than the {context} context tokens of the "
                "generation-like perplexity; lower evaluation.ppl_context_tokens"
            )
    # The context's last token predicts the first scored one: edits act from there, and the
    # tokens before it are the shared prefix.
    prefix = max(skip - 1, 0)
    order = sorted(range(len(token_windows)), key=lambda i: -len(token_windows[i]))
    ctx = Context(prompt_ids=list(ids), phase="from" if positions == "generation" else positions)
    hooks = [Hooks(adapter, spec, prompt_ids=list(ids), ctx=ctx) for spec in specs]
    sharing = [prefix > 0 and shares_prefix(s) for s in specs]
    totals, counts = [0.0] * len(specs), [0] * len(specs)
    seconds = [0.0] * len(specs)
    for start in range(0, len(order), batch_size):
        rows = [token_windows[i] for i in order[start : start + batch_size]]
        ctx.prompt_ids = [ids[i] for i in order[start : start + batch_size]]
        width = max(map(len, rows))
        # Right padding: real tokens start at position 0 in every row, so "position 0"
        # means the same token everywhere and default position ids are right.
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, w in enumerate(rows):
            batch[r, : len(w)] = torch.as_tensor(w)
            mask[r, : len(w)] = 1
        batch, mask = batch.to(device), mask.to(device)
        shared, cache = None, None
        if any(sharing):
            t0 = time.perf_counter()
            # Every window is longer than the context, so the prefix has no padding.
            cache = StaticCache(config=model.config, max_cache_len=width)
            model(
                input_ids=batch[:, :prefix],
                attention_mask=mask[:, :prefix],
                past_key_values=cache,
                cache_position=torch.arange(prefix, device=device),
                use_cache=True,
                logits_to_keep=1,
            )
            shared = snapshot(cache)
            spent = (time.perf_counter() - t0) / sum(sharing)
            for j, s in enumerate(sharing):
                seconds[j] += spent if s else 0.0
        for j, h in enumerate(hooks):
            t0 = time.perf_counter()
            first = prefix if sharing[j] else 0
            ctx.start = prefix - first
            with h.attached():
                if sharing[j]:
                    restore(cache, shared)
                    at = torch.arange(first, width, device=device)
                    logits = model(
                        input_ids=batch[:, first:],
                        attention_mask=mask,
                        position_ids=at.expand(len(rows), -1),
                        past_key_values=cache,
                        cache_position=at,
                        use_cache=True,
                    ).logits
                else:
                    logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                batch[:, first + 1 :].flatten(),
                reduction="none",
            )
            scored = mask[:, first + 1 :].clone()
            scored[:, : prefix - first] = 0  # predictions of context tokens are not scored
            keep = scored.flatten().bool()
            totals[j] += float(nll[keep].double().sum())
            counts[j] += int(keep.sum())
            seconds[j] += time.perf_counter() - t0
        del cache, shared
    return [
        Perplexity(total / count, count, len(token_windows), secs)
        for total, count, secs in zip(totals, counts, seconds, strict=True)
    ]


_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased ``\\w+`` tokens: the tokenisation of the reference's repetition metric."""
    return _WORD.findall(text.lower())


def repetition(text: str, n: int = 2) -> float:
    """``1 - distinct n-grams / n-grams`` of one text's word tokens; 0 with fewer than ``n``."""
    toks = word_tokens(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def text_quality(texts: Sequence[str]) -> dict[str, float]:
    """``distinct_1``, ``distinct_2`` (corpus-level), ``repetition`` (mean bigram repetition
    per text) and ``empty_share`` of ``texts`` (module doc); distinct-n is NaN without any
    n-gram."""
    toks = [word_tokens(t) for t in texts]
    out: dict[str, float] = {}
    for n in (1, 2):
        grams = [tuple(t[i : i + n]) for t in toks for i in range(len(t) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else float("nan")
    out["repetition"] = float(np.mean([repetition(t) for t in texts])) if texts else float("nan")
    out["empty_share"] = float(np.mean([not t for t in toks])) if texts else float("nan")
    return out
