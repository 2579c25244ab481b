"""Counting a causal LM's forward FLOPs, to compare measured speed with the machine's GEMM rate.

A multiply-add is 2 FLOPs. Per token: every weight matrix of the decoder layers once
(``2 * weights``), attention scores and the weighted sum over the ``ctx`` keys it sees
(``4 * n_layers * n_heads * head_dim * ctx``), and the unembedding for tokens whose logits are
computed (``2 * vocab * d_model``). Norms, activations, softmax and the embedding lookup are
left out: they are a few per cent at most and run no GEMM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dpotox.engine.arch import Adapter


def decoder_weights(adapter: Adapter) -> int:
    """Multiply-adds per token in the decoder layers' matrices (2-D weights, all layers)."""
    return sum(
        p.numel()
        for layer in range(adapter.n_layers)
        for p in adapter.layer(layer).parameters()
        if p.dim() == 2
    )


def attention_width(model: nn.Module) -> int:
    """``n_heads * head_dim``: the width of one token's queries."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = (
        getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    )
    return heads * head_dim


def forward_flops(adapter: Adapter, contexts: Iterable[int], *, logit_tokens: int) -> float:
    """FLOPs of a forward pass over tokens that see ``contexts`` keys each (one entry per token).

    Args:
        contexts: for every real token processed, how many positions it attends to
            (itself included); padding is not counted.
        logit_tokens: how many of those tokens had their logits computed.
    """
    ctx = list(contexts)
    emb = adapter.unembedding()
    return (
        2.0 * decoder_weights(adapter) * len(ctx)
        + 4.0 * adapter.n_layers * attention_width(adapter.model) * sum(ctx)
        + 2.0 * emb.shape[0] * emb.shape[1] * logit_tokens
    )


def generation_contexts(prompt_lengths: Iterable[int], new_lengths: Iterable[int]) -> list[int]:
    """Per real token of a greedy run: prompt tokens see their prefix, step k sees prompt + k.

    The last generated token is never fed back, so a row with ``g`` new tokens runs ``g - 1``
    decode steps.
    """
    out: list[int] = []
    for p, g in zip(prompt_lengths, new_lengths, strict=True):
        out += range(1, p + 1)
        out += range(p + 1, p + g)
    return out


class WorkMeter:
    """Model FLOPs of every forward pass through the models it is attached to, in this process.

    The usual model-FLOPs count (as in "MFU"): per token ``2 x`` the weights of every linear
    layer of the decoder stack, plus ``2 x`` the output head's for each token whose logits are
    computed (``logits_to_keep``; every position for TRL's fused head, which on a GPU with
    Triton projects only the labelled positions, so there the count is high); a pass with gradients
    on a model in training mode counts three times (forward and backward). Attention scores,
    norms and activations are left out, as are recomputation under gradient checkpointing and
    the full KL's own projections of DPO. Tokens are
    what the model ran, padding included: the fraction of the hardware a job used, not of its
    useful work. :func:`dpotox.sources.load_prepared` attaches every model it loads to
    :data:`WORK`; :func:`dpotox.logs.rule_log` resets it when a job starts and logs it when
    the job ends, which ``bench/stage_efficiency.py`` reads.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = 0  # tokens through a model, forward
        self.trained_tokens = 0  # of those, with a backward pass
        self.flops = 0.0

    def attach(self, model: nn.Module) -> None:
        """Count every forward of ``model`` (a causal LM with input and output embeddings):
        its decoder stack (``base_model``, also when called alone, as the probe's features do)
        and its output head (called as a module, or fused into TRL's loss)."""
        head = model.get_output_embeddings()
        body = model.base_model
        body_size = sum(
            m.weight.numel()
            for m in body.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2
            and not isinstance(m, nn.Embedding)
        )
        head_size = head.weight.numel()

        def add(module: nn.Module, tokens: int, size: int, is_body: bool) -> None:
            trained = torch.is_grad_enabled() and module.training
            if is_body:
                self.tokens += tokens
                self.trained_tokens += tokens if trained else 0
            self.flops += (3 if trained else 1) * 2.0 * size * tokens

        def on_body(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is not None:
                add(
                    module,
                    int(x.shape[0]) * (int(x.shape[1]) if x.dim() > 1 else 1),
                    body_size,
                    True,
                )

        def on_head(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            add(module, args[0].numel() // args[0].shape[-1], head_size, False)

        def on_fused(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # TRL's fused loss multiplies by the head's weight without calling the head.
            x = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("fused_lm_head") and x is not None:
                add(module, x.numel(), head_size, False)

        body.register_forward_pre_hook(on_body, with_kwargs=True)
        head.register_forward_hook(on_head)
        model.register_forward_pre_hook(on_fused, with_kwargs=True)


#: The meter of this process (see :class:`WorkMeter`).
WORK = WorkMeter()


@dataclass
class GemmRate:
    """A matrix-multiply rate in FLOP/s: the fastest single GEMM, and a sustained loop."""

    peak: float
    sustained: float


def gemm_rate(
    dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 3.0, device: str = "cpu"
) -> GemmRate:
    """This machine's rate for back-to-back ``n x n x n`` GEMMs of ``dtype``.

    ``peak`` is the fastest single GEMM; ``sustained`` is the rate over a loop of at least
    ``seconds``, which is what a job of minutes gets: on a shared or boost-clocked CPU it is
    well below the peak (about 170 against 250 GFLOP/s on our 2-core machines).
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool, caches

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    times: list[float] = []
    sync()
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return GemmRate(flops / min(times), flops * len(times) / (time.perf_counter() - start))
