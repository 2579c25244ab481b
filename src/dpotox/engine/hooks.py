"""The one hook engine: applies an :class:`~dpotox.engine.spec.Intervention` to a model.

:func:`applied` registers the hooks for one spec (or :class:`Hooks` for several specs decoded
stacked in one batch) and removes them, and puts every weight back, when its block ends, also
on error. The caller says what each forward pass is (:class:`Context`: prefill, decode, ...),
so ``"generation"`` edits act on the right positions; a :class:`Recorder` reads the
activations after the edits (activation caching).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from dpotox.engine.arch import Adapter
from dpotox.engine.spec import (
    AddResidual,
    Intervention,
    InterventionError,
    ScaleKeys,
    ScaleNeurons,
    SetNeurons,
    check,
)

# What the model is doing, set by the caller on the Context before each forward pass:
#   prefill: the prompt (``generation`` edits act on its last position only)
#   prefix:  the prompt but its last token (``generation`` edits and recorders do not act)
#   decode:  one new token per row, or a prompt's last token after its prefix (every edit)
#   all:     teacher-forced scoring, every edit at every position (perplexity)
#   first:   teacher-forced scoring, ``generation`` edits at position 0 only, ``all`` edits
#            (steering, value-vector ablation) everywhere (the reference code's perplexity)
#   from:    teacher-forced scoring as generation sees it: ``generation`` edits from position
#            ``Context.start`` on (the last token of an unedited context), ``all`` edits
#            everywhere
Phase = Literal["prefill", "prefix", "decode", "all", "first", "from"]


@dataclass
class Context:
    """What the hooks need to know about the forward pass about to run (set by the caller)."""

    phase: Phase = "all"
    prompt_ids: Sequence[str] | None = None
    # Rows whose position in this pass produces a kept token (a row that has emitted an
    # end-of-sequence token is inactive); None means every row.
    active: torch.Tensor | None = None
    # Phase "from": the first position ``generation`` edits act on.
    start: int = 0


class Recorder(Protocol):
    """Reads neuron activations ``m`` as the model runs (activation caching).

    Its hook sits on every layer's output projection and sees the activations the model
    actually uses, after the spec's edits. ``record`` gets ``m`` as ``[batch, positions,
    d_mlp]``: the positions a ``generation`` edit acts on (the last prompt position in
    prefill, the new token in decode, every position in teacher-forced scoring). For families
    with a post-MLP norm (Gemma-2/3, OLMo-2) it also gets ``scale``, ``[batch, positions, 1]``
    float32: the factor ``1 / rms`` that norm applies to each token's MLP output, so that
    ``m * scale`` is what each neuron writes in units of :meth:`Adapter.written_vectors
    <dpotox.engine.arch.Adapter.written_vectors>`; None for the other families. The caller of
    the forward passes calls ``start`` when a batch of prompts begins and ``finish`` when it
    is done.
    """

    def start(self, ctx: Context) -> None: ...

    def record(
        self, layer: int, m: torch.Tensor, ctx: Context, scale: torch.Tensor | None = None
    ) -> None: ...

    def finish(self, ctx: Context) -> None: ...


def _positions(ctx: Context, where: str) -> slice | None:
    """The positions of this pass an edit acts on; None for none."""
    if ctx.phase == "first":
        return slice(0, 1) if where == "generation" else slice(None)
    if ctx.phase == "from":
        return slice(ctx.start, None) if where == "generation" else slice(None)
    if ctx.phase == "prefill" and where == "generation":
        return slice(-1, None)
    if ctx.phase == "prefix" and where == "generation":
        return None
    return slice(None)


class _NeuronHook:
    """One forward pre-hook per layer: applies that layer's set/scale edits in order."""

    def __init__(
        self,
        edits: list[SetNeurons | ScaleNeurons],
        ctx: Context,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.ctx = ctx
        # The batch rows the edits act on: all, or one condition's block when several
        # conditions run stacked in one batch (dpotox.engine.generate.generate_many).
        self.rows = slice(None)
        self.items = []
        for e in edits:
            idx = e.neurons.to(device)
            if isinstance(e, SetNeurons):
                rows = (
                    {p: j for j, p in enumerate(e.prompt_ids)} if e.prompt_ids is not None else None
                )
                self.items.append(("set", idx, e.values.to(device, dtype), rows, e.where))
            else:
                self.items.append(("scale", idx, e.factors.to(device, dtype), None, e.where))

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        m = args[0]
        # Write in place when nothing needs the original (inference); copy under autograd.
        if torch.is_grad_enabled() and m.requires_grad:
            m = m.clone()
        for kind, idx, vals, rows, where in self.items:
            pos = _positions(self.ctx, where)
            if pos is None:
                continue
            if rows is not None:
                try:
                    sel = torch.tensor([rows[p] for p in self.ctx.prompt_ids], device=vals.device)
                except (KeyError, TypeError):
                    raise InterventionError(
                        "per-prompt values are needed for prompts "
                        f"{list(self.ctx.prompt_ids or [])[:3]}..., but the spec has no row for "
                        "one of them (or the caller set no prompt ids)"
                    ) from None
                vals = vals[sel].unsqueeze(1)  # [batch, 1, n]: one row per prompt, all positions
            if kind == "set":
                m[self.rows, pos, idx] = vals
            else:
                m[self.rows, pos, idx] = m[self.rows, pos, idx] * vals
        return (m, *args[1:])


class _ResidualHook:
    """A forward hook on a decoder layer that adds the summed steering vectors to its output."""

    def __init__(
        self, edits: list[AddResidual], ctx: Context, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.ctx = ctx
        self.rows = slice(None)  # as _NeuronHook.rows
        self.items = [((e.alpha * e.vector).to(device, dtype), e.where) for e in edits]

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and h.requires_grad:
            h = h.clone()
        for vec, where in self.items:
            pos = _positions(self.ctx, where)
            if pos is not None:
                h[self.rows, pos] += vec
        return (h, *output[1:]) if isinstance(output, tuple) else h


@contextmanager
def _scaled_keys(adapter: Adapter, layer: int, edits: list[ScaleKeys]) -> Iterator[None]:
    module = adapter.key_proj(layer)
    original = module.weight
    # The edit goes into a copy swapped in for the block, so the model's tensor is never
    # written and putting the original Parameter back restores it bit for bit.
    module.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
    try:
        keys = adapter.key_vectors(layer)
        with torch.no_grad():
            for e in edits:
                idx = e.neurons.to(keys.device)
                keys[idx] = keys[idx] * e.factors.to(keys.device, keys.dtype).reshape(-1, 1)
        yield
    finally:
        module.weight = original


class _RecordHook:
    """A forward hook on one layer's output projection that hands the activations it ran on
    (after the edit pre-hooks) and, for post-MLP-norm families, the norm's per-token scale of
    its output to a :class:`Recorder`."""

    def __init__(self, adapter: Adapter, layer: int, recorder: Recorder, ctx: Context) -> None:
        self.adapter, self.layer, self.recorder, self.ctx = adapter, layer, recorder, ctx
        self.normed = adapter.post_mlp_norm(layer) is not None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pos = _positions(self.ctx, "generation")
        if pos is None:
            return
        # The norm's input is the projection's output, bias included (the MLP returns it as it
        # is in every post-norm family; verify.write_sum checks that on each model).
        scale = (
            self.adapter.post_mlp_norm_scale(self.layer, output[:, pos]) if self.normed else None
        )
        self.recorder.record(self.layer, args[0][:, pos], self.ctx, scale)


class Hooks:
    """One spec made ready to apply: checked, grouped by layer and module, its arrays on the
    model's device. :meth:`attached` registers the hooks for a block; a caller that switches
    between specs (a sweep) prepares each once and attaches it as often as it needs."""

    def __init__(
        self,
        adapter: Adapter,
        spec: Intervention | None,
        *,
        prompt_ids: Sequence[str] | None = None,
        recorder: Recorder | None = None,
        ctx: Context | None = None,
    ) -> None:
        self.adapter, self.recorder = adapter, recorder
        self.ctx = ctx if ctx is not None else Context(prompt_ids=prompt_ids)
        edits = spec.edits if spec is not None else []
        if edits:
            check(spec, adapter, prompt_ids=prompt_ids)
        p = next(adapter.model.parameters())
        neuron_edits: dict[int, list] = defaultdict(list)
        residual_edits: dict[int, list] = defaultdict(list)
        self.key_edits: dict[int, list] = defaultdict(list)
        for e in edits:
            target = (
                neuron_edits
                if isinstance(e, SetNeurons | ScaleNeurons)
                else residual_edits
                if isinstance(e, AddResidual)
                else self.key_edits
            )
            target[e.layer].append(e)
        self.neuron_hooks = {
            layer: _NeuronHook(es, self.ctx, p.device, p.dtype)
            for layer, es in neuron_edits.items()
        }
        self.residual_hooks = {
            layer: _ResidualHook(es, self.ctx, p.device, p.dtype)
            for layer, es in residual_edits.items()
        }

    def restrict(self, rows: slice) -> None:
        """Act on these batch rows only (one condition's block of a stacked batch); weight
        edits cannot be restricted, so a spec with one cannot be stacked."""
        if self.key_edits and rows != slice(None):
            raise InterventionError(
                "a weight edit (scale_keys) acts on every row of a batch; run its spec alone"
            )
        for hook in (*self.neuron_hooks.values(), *self.residual_hooks.values()):
            hook.rows = rows

    @contextmanager
    def attached(self) -> Iterator[Context]:
        """Register the hooks (and swap in edited weights) for the block; yield the context.

        On leaving the block, also by an exception, every hook is removed and every edited
        weight is put back."""
        adapter = self.adapter
        with ExitStack() as stack:
            for layer, edits in self.key_edits.items():
                stack.enter_context(_scaled_keys(adapter, layer, edits))
            for layer, hook in self.neuron_hooks.items():
                stack.callback(adapter.out_proj(layer).register_forward_pre_hook(hook).remove)
            for layer, hook in self.residual_hooks.items():
                stack.callback(adapter.layer(layer).register_forward_hook(hook).remove)
            if self.recorder is not None:
                # A forward hook: it runs after every pre-hook, so it sees the edited values
                # (the arguments the module ran on) and the output the post-MLP norm gets.
                for layer in range(adapter.n_layers):
                    h = adapter.out_proj(layer).register_forward_hook(
                        _RecordHook(adapter, layer, self.recorder, self.ctx)
                    )
                    stack.callback(h.remove)
            yield self.ctx


@contextmanager
def applied(
    adapter: Adapter,
    spec: Intervention | None,
    *,
    prompt_ids: Sequence[str] | None = None,
    recorder: Recorder | None = None,
) -> Iterator[Context]:
    """Apply ``spec`` to the adapter's model for the block; yield the :class:`Context` to steer.

    The spec is checked first (nothing is registered if it cannot apply). On leaving the block,
    also by an exception, every hook is removed and every edited weight is put back.
    ``spec=None`` applies nothing, so callers need not branch. A ``recorder`` reads every
    layer's activations after the spec's edits.
    """
    with Hooks(adapter, spec, prompt_ids=prompt_ids, recorder=recorder).attached() as ctx:
        yield ctx
