"""The adapter's checks, measured on one real model before any stage spends work on it.

:mod:`dpotox.engine.arch` says where a family keeps its neurons; :func:`verify_adapter` measures
that it is so for the model at hand, on a few tokens (``prepare_model`` runs it on every
model it prepares, ``dpotox inspect-model --check`` on request):

- ``hook_read``: the activations ``m`` the hook point sees equal ``m`` recomputed from the
  MLP's input and the key (gate, up) weights, so the hook reads what the MLP computes;
- ``write_sum``: what the decoder block adds to the residual stream through its MLP equals
  ``sum_i m_i v_i``, the per-neuron contributions. It is measured, not assumed: the block's
  output with every neuron of the layer ablated (the one hook engine, on a copy of the batch
  row) is subtracted from its output as it is. Families with a post-MLP norm (Gemma-2, Gemma-3,
  OLMo-2) add ``norm(MLP output) = s * g * (MLP output)``; for them the contributions are
  ``(m_i s) (g * v_i)`` (the decomposition the neuron table uses), with ``s`` the norm's
  per-token scale of ``sum_i m_i v_i (+ bias)`` and ``g`` its gain;
- ``noop_hook``: the hook engine applying edits that change nothing (scaling neurons and keys
  by 1, adding 0 times a vector to the residual stream) and recording every layer leaves the
  logits bit-identical, so hooks themselves never move a number.

A model that fails stops with :class:`AdapterCheckError`, naming the check, the layer and the
error, so no table is ever computed from a misread model.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from dpotox.engine.arch import Adapter
from dpotox.engine.hooks import Context, Hooks
from dpotox.engine.spec import AddResidual, Intervention, ScaleKeys, ScaleNeurons, SetNeurons
from dpotox.errors import UnsupportedModelError

# Relative error allowed, by the model's dtype: a misread model is off by order one, rounding
# by about the dtype's epsilon times the depth of the sums involved.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
CHECKS = ("hook_read", "write_sum", "noop_hook")


class AdapterCheckError(UnsupportedModelError):
    """The adapter misreads this model; the message names the check that failed."""


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``scale``."""
    return float(
        (got.float() - want.float()).abs().max() / scale.float().abs().max().clamp_min(1e-12)
    )


def _fail(check: str, adapter: Adapter, layer: int | None, what: str) -> AdapterCheckError:
    where = f" at layer {layer}" if layer is not None else ""
    return AdapterCheckError(
        f"adapter check {check!r} failed{where} for this {adapter.family.name} model "
        f"(model_type {adapter.model.config.model_type!r}): {what}. The family table "
        "(dpotox.engine.arch.FAMILIES) does not describe this model; no stage can run on it "
        "until it does"
    )


def _hook_read(adapter: Adapter, ids: torch.Tensor, tol: float) -> float:
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def grab(key: tuple[str, int]):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args:
                raise _fail(
                    "hook_read",
                    adapter,
                    key[1],
                    f"the {key[0]} module is called with keyword arguments only, so a forward "
                    "pre-hook cannot read its input",
                )
            seen[key] = args[0].detach()

        return hook

    with ExitStack() as stack:
        for layer in range(adapter.n_layers):
            for name, module in (("mlp", adapter.mlp(layer)), ("m", adapter.out_proj(layer))):
                stack.callback(module.register_forward_pre_hook(grab((name, layer))).remove)
        adapter.model(ids)
    worst = 0.0
    for layer in range(adapter.n_layers):
        if ("m", layer) not in seen or ("mlp", layer) not in seen:
            raise _fail("hook_read", adapter, layer, "the MLP or its output projection never ran")
        m = seen[("m", layer)]
        if m.shape[-1] != adapter.d_mlp:
            raise _fail(
                "hook_read",
                adapter,
                layer,
                f"the hook point's input has width {m.shape[-1]}, not d_mlp {adapter.d_mlp}",
            )
        recomputed = adapter.activations_from_input(layer, seen[("mlp", layer)])
        if recomputed.shape != m.shape:
            raise _fail(
                "hook_read",
                adapter,
                layer,
                f"the key weights give {recomputed.shape[-1]} activations per token, the hook "
                f"point reads {m.shape[-1]}",
            )
        err = _error(recomputed, m, m)
        if err > tol:
            raise _fail(
                "hook_read",
                adapter,
                layer,
                f"the activations recomputed from the MLP input and the key weights differ from "
                f"the hooked ones by {err:.2g} of their largest value (allowed {tol:g})",
            )
        worst = max(worst, err)
    return worst


def _write_sum(adapter: Adapter, ids: torch.Tensor, tol: float) -> float:
    n = adapter.n_layers
    # Row 0 runs as it is; row 1 + l has every neuron of layer l ablated. A row's inputs to
    # layer l are row 0's, so the difference of their layer-l outputs is what the MLP added.
    batch = ids.expand(1 + n, -1)
    outputs: dict[int, torch.Tensor] = {}
    m0: dict[int, torch.Tensor] = {}
    y0: dict[int, torch.Tensor] = {}  # the MLP output the post-MLP norm receives
    every = torch.arange(adapter.d_mlp)
    with ExitStack() as stack:
        for layer in range(n):
            hooks = Hooks(
                adapter, Intervention("zero", [SetNeurons(layer, every, 0.0, where="all")])
            )
            hooks.restrict(slice(1 + layer, 2 + layer))
            # Read m before the ablation hook runs (pre-hooks run in registration order).
            stack.callback(
                adapter.out_proj(layer)
                .register_forward_pre_hook(
                    lambda mod, args, layer=layer: m0.__setitem__(layer, args[0][0].clone())
                )
                .remove
            )
            stack.enter_context(hooks.attached())
            stack.callback(
                adapter.out_proj(layer)
                .register_forward_hook(
                    lambda mod, args, out, layer=layer: y0.__setitem__(layer, out[0].detach())
                )
                .remove
            )
            stack.callback(
                adapter.layer(layer)
                .register_forward_hook(
                    lambda mod, args, out, layer=layer: outputs.__setitem__(
                        layer, _output(out).detach()
                    )
                )
                .remove
            )
        adapter.model(batch)
    eps = torch.finfo(m0[0].dtype).eps
    worst = 0.0
    for layer in range(n):
        out = outputs[layer]
        increment = out[0] - out[1 + layer]
        norm = adapter.post_mlp_norm(layer)
        if norm is None:
            writes = m0[layer] @ adapter.value_vectors(layer)
        else:
            # The decomposition the neuron table uses: each token's norm scale, taken from the
            # MLP output as the activation cache takes it, folded into the activations, the
            # gain into the value vectors. A misread value vector or gain changes the sum.
            bias = adapter.out_bias(layer)
            s = adapter.post_mlp_norm_scale(layer, y0[layer])
            writes = (m0[layer].float() * s) @ adapter.written_vectors(layer).float()
            if bias is not None:
                writes = writes + s * (bias * adapter.post_mlp_norm_gain(layer)).float()
        # The increment is a difference of two residual streams: its rounding is the stream's.
        slack = 8 * eps * float(out[0].float().abs().max())
        diff = float((increment.float() - writes.float()).abs().max())
        scale = max(float(writes.float().abs().max()), 1e-12)
        err = diff / scale
        if max(diff - slack, 0.0) / scale > tol:
            what = (
                "sum_i (m_i s) (g * v_i), the per-neuron contributions through the post-MLP "
                f"norm {adapter.family.post_mlp_norm} (s its per-token scale, g its gain)"
                if norm is not None
                else "sum_i m_i v_i (the per-neuron contributions)"
            )
            raise _fail(
                "write_sum",
                adapter,
                layer,
                f"what the layer adds to the residual stream through its MLP differs from "
                f"{what} by {err:.2g} of its largest value (allowed {tol:g})",
            )
        worst = max(worst, err)
    return worst


class _Reader:
    """A recorder that keeps nothing: the caching hooks run, and must change nothing."""

    def start(self, ctx: Context) -> None:
        pass

    def record(
        self, layer: int, m: torch.Tensor, ctx: Context, scale: torch.Tensor | None = None
    ) -> None:
        m.sum()

    def finish(self, ctx: Context) -> None:
        pass


def _noop_hook(adapter: Adapter, ids: torch.Tensor) -> float:
    base = adapter.model(ids).logits
    d_model = adapter.d_model
    edits: list = []
    for layer in range(adapter.n_layers):
        edits += [
            ScaleNeurons(layer, [0, adapter.d_mlp - 1], [1.0, 1.0], where="all"),
            AddResidual(layer, torch.ones(d_model), alpha=0.0),
        ]
    edits.append(ScaleKeys(0, [0], [1.0]))
    with Hooks(adapter, Intervention("noop", edits), recorder=_Reader()).attached() as ctx:
        ctx.phase = "all"
        hooked = adapter.model(ids).logits
    if not torch.equal(base, hooked):
        raise _fail(
            "noop_hook",
            adapter,
            None,
            "edits that change nothing moved the logits by "
            f"{float((base - hooked).abs().max()):.3g}, so the hooks alter the computation",
        )
    return 0.0


@torch.no_grad()
def verify_adapter(adapter: Adapter, ids: torch.Tensor) -> dict[str, float]:
    """Run the checks of this module on ``ids`` (``[1, tokens]``, a few real tokens).

    Returns:
        ``{check: largest relative error}`` for :data:`CHECKS` (0 for ``noop_hook``, which
        must be exact).

    Raises:
        AdapterCheckError: a check failed; the message names it, the layer and the error.
    """
    model = adapter.model
    ids = ids.to(next(model.parameters()).device)
    tol = TOLERANCE.get(next(model.parameters()).dtype, 5e-2)
    was_training = model.training
    model.eval()
    try:
        return {
            "hook_read": _hook_read(adapter, ids, tol),
            "write_sum": _write_sum(adapter, ids, tol),
            "noop_hook": _noop_hook(adapter, ids),
        }
    finally:
        model.train(was_training)
