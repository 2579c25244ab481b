"""Where each architecture family keeps its MLP neurons.

For every supported family an MLP layer writes ``sum_i m_i * v_i (+ bias)`` to the residual
stream, and ``m`` is exactly the input of the MLP's output projection. So one hook point, a
forward pre-hook on that projection, reads and writes every neuron of every family; this
module says where that projection is, and where the value vectors ``v_i`` (what a neuron
writes), key vectors (what it reads), embeddings, unembedding and final norm live.

GPT-2 stores its projections as ``Conv1D`` with weight ``[in, out]``: value vector i is
**row** i of ``c_proj.weight``. Every other family uses ``nn.Linear`` (weight ``[out, in]``):
value vector i is **column** i of ``down_proj.weight``. The adapter hides the transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpotox.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts (attribute paths from the causal LM)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values that belong to the family
    layers: str  # the list of decoder blocks
    mlp: str  # the MLP inside a block
    out_proj: str  # the MLP's output projection, inside the MLP
    key_proj: str  # the projection whose rows/columns are the key vectors (gate for GLUs)
    up_proj: str | None  # GLUs: the linear branch multiplied with the activated gate
    conv1d: bool  # weights stored [in, out] (GPT-2's Conv1D) rather than [out, in]
    embed: str
    final_norm: str
    act: str = "act_fn"  # the MLP's activation function, inside the MLP
    # Phi-3 fuses gate and up into one projection: rows [0, d_mlp) gate, [d_mlp, 2 d_mlp) up.
    fused_gate_up: bool = False
    # A norm the block applies to the MLP output before adding it to the residual stream
    # (inside the block); None where the MLP output is added as it is.
    post_mlp_norm: str | None = None
    # The gain of the family's norms is weight + this: Gemma's RMSNorm stores gamma with the 1
    # taken out (it multiplies by 1 + weight); the others multiply by weight.
    norm_gain_offset: float = 0.0


def _glu(
    name: str, *model_types: str, post_mlp_norm: str | None = None, gain_offset: float = 0.0
) -> Family:
    """A Llama-style gated MLP (gate_proj, up_proj, down_proj) under ``model.layers``."""
    return Family(
        name,
        model_types or (name,),
        "model.layers",
        "mlp",
        "down_proj",
        "gate_proj",
        "up_proj",
        False,
        "model.embed_tokens",
        "model.norm",
        post_mlp_norm=post_mlp_norm,
        norm_gain_offset=gain_offset,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            ("gpt2",),
            "transformer.h",
            "mlp",
            "c_proj",
            "c_fc",
            None,
            True,
            "transformer.wte",
            "transformer.ln_f",
            act="act",
        ),
        _glu("llama"),
        _glu("mistral"),
        _glu("gemma", gain_offset=1.0),
        _glu("gemma2", post_mlp_norm="post_feedforward_layernorm", gain_offset=1.0),
        # gemma3 is the multimodal checkpoint; prepare_model keeps its text tower (gemma3_text).
        _glu(
            "gemma3",
            "gemma3_text",
            "gemma3",
            post_mlp_norm="post_feedforward_layernorm",
            gain_offset=1.0,
        ),
        _glu("qwen2"),
        _glu("qwen3"),
        _glu("olmo"),
        # OLMo-2 has no norm before the MLP, only after it.
        _glu("olmo2", post_mlp_norm="post_feedforward_layernorm"),
        # Pythia: attention and MLP in parallel, each added to the residual stream.
        Family(
            "gpt_neox",
            ("gpt_neox",),
            "gpt_neox.layers",
            "mlp",
            "dense_4h_to_h",
            "dense_h_to_4h",
            None,
            False,
            "gpt_neox.embed_in",
            "gpt_neox.final_layer_norm",
            act="act",
        ),
        Family(
            "phi3",
            ("phi3",),
            "model.layers",
            "mlp",
            "down_proj",
            "gate_up_proj",
            None,
            False,
            "model.embed_tokens",
            "model.norm",
            act="activation_fn",
            fused_gate_up=True,
        ),
    )
}

SUPPORTED = tuple(FAMILIES)
# Model types refused with a reason rather than as unknown.
REFUSED = {
    **dict.fromkeys(
        (
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "phimoe",
            "deepseek_v2",
            "deepseek_v3",
            "dbrx",
            "jamba",
            "granitemoe",
            "switch_transformers",
        ),
        "it is a mixture of experts: a neuron belongs to one expert and runs only for the "
        "tokens routed to it, so a layer's MLP is not one sum of neuron writes",
    ),
}


def family_of(model_type: str) -> Family:
    """The family a ``config.model_type`` belongs to, or an error listing the supported ones."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    if model_type in REFUSED:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: {REFUSED[model_type]}; supported "
            f"families: {', '.join(SUPPORTED)}"
        )
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported families: "
        f"{', '.join(SUPPORTED)} (model types: "
        f"{', '.join(t for f in FAMILIES.values() for t in f.model_types)})"
    )


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Adapter:
    """Uniform access to the neurons of one causal LM.

    Args:
        model: a Hugging Face causal LM of a supported family.
        family: the configured family; checked against the model's ``model_type``.
    """

    def __init__(self, model: nn.Module, family: str | None = None) -> None:
        fam = family_of(model.config.model_type)
        if family is not None and family != fam.name:
            raise UnsupportedModelError(
                f"the config says family {family!r} but the model is a {fam.name!r} "
                f"(model_type {model.config.model_type!r}); set the model's family to {fam.name!r}"
            )
        self.model = model
        self.family = fam
        self._layers = _get(model, fam.layers)

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_mlp(self) -> int:
        return self.value_vectors(0).shape[0]

    @property
    def d_model(self) -> int:
        return self.value_vectors(0).shape[1]

    def layer(self, layer: int) -> nn.Module:
        """Decoder block ``layer``; its output is the residual stream after that layer."""
        return self._layers[layer]

    def mlp(self, layer: int) -> nn.Module:
        """The MLP block of a layer (its output is what the layer writes to the residual)."""
        return _get(self._layers[layer], self.family.mlp)

    def out_proj(self, layer: int) -> nn.Module:
        """The hook point: a forward pre-hook on this module sees (and may replace) ``m``."""
        return _get(self.mlp(layer), self.family.out_proj)

    def _vectors(self, module: nn.Module, *, reads: bool) -> torch.Tensor:
        # Linear: weight [out, in]. Conv1D: weight [in, out]. A neuron's value vector lives
        # along the projection's input axis, its key vector along the output axis.
        w = module.weight
        if self.family.conv1d:
            return w if not reads else w.T
        return w.T if not reads else w

    def value_vectors(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]``: row i is what neuron i writes per unit of activation (a view)."""
        return self._vectors(self.out_proj(layer), reads=False)

    def out_bias(self, layer: int) -> torch.Tensor | None:
        """The output projection's bias (GPT-2), added once per token; None for the others."""
        return self.out_proj(layer).bias

    def key_proj(self, layer: int) -> nn.Module:
        """The projection holding the key vectors (GPT-2 ``c_fc``, the gate for GLUs)."""
        return _get(self.mlp(layer), self.family.key_proj)

    def key_vectors(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]``: row i is what neuron i reads (the gate for GLUs) (a view)."""
        keys = self._vectors(self.key_proj(layer), reads=True)
        # A fused gate-up projection: the gate half only, so key scaling leaves `up` alone.
        return keys[: self.d_mlp] if self.family.fused_gate_up else keys

    def key_bias(self, layer: int) -> torch.Tensor | None:
        bias = self.key_proj(layer).bias
        return bias[: self.d_mlp] if bias is not None and self.family.fused_gate_up else bias

    def up_vectors(self, layer: int) -> torch.Tensor | None:
        """GLUs only: ``[d_mlp, d_model]`` rows of the up projection; None for GPT-2."""
        if self.family.fused_gate_up:
            return self.key_proj(layer).weight[self.d_mlp :]
        if self.family.up_proj is None:
            return None
        return _get(self.mlp(layer), self.family.up_proj).weight

    def activation_fn(self, layer: int):
        """The MLP's non-linearity (applied to the key/gate projection)."""
        return getattr(self.mlp(layer), self.family.act)

    def activations_from_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Recompute ``m`` from the MLP input ``x`` and the layer's weights (no hooks).

        GPT-2, GPT-NeoX: ``act(x K^T + b)``; GLUs: ``act(x G^T) * (x U^T)``.
        """
        k = x @ self.key_vectors(layer).T
        kb = self.key_bias(layer)
        if kb is not None:
            k = k + kb
        m = self.activation_fn(layer)(k)
        up = self.up_vectors(layer)
        if up is not None:
            m = m * (x @ up.T)
        return m

    def input_embedding(self) -> torch.Tensor:
        """``[vocab, d_model]`` input embedding matrix."""
        return _get(self.model, self.family.embed).weight

    def unembedding(self) -> torch.Tensor:
        """``[vocab, d_model]`` output embedding (logits = h @ W^T)."""
        return self.model.get_output_embeddings().weight

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm the block applies to the MLP output before the residual stream (Gemma-2,
        Gemma-3), or None where the MLP output is added as it is."""
        if self.family.post_mlp_norm is None:
            return None
        return _get(self._layers[layer], self.family.post_mlp_norm)

    def post_mlp_norm_gain(self, layer: int) -> torch.Tensor | None:
        """``[d_model]``: the post-MLP norm's per-channel gain (Gemma: ``1 + weight``), or None
        where the family has no such norm."""
        norm = self.post_mlp_norm(layer)
        if norm is None:
            return None
        return norm.weight + self.family.norm_gain_offset

    def post_mlp_norm_scale(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """``[..., 1]`` float32: the per-token factor ``1 / rms(y)`` the post-MLP norm applies
        to the MLP output ``y`` before its gain, so that ``norm(y) = scale * gain * y``."""
        norm = self.post_mlp_norm(layer)
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = norm.variance_epsilon
        y = y.float()
        return torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)

    def written_vectors(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]``: what neuron i adds to the residual stream per unit of its
        written activation ``m_i * scale`` (docs/neurons.md, "What the layer writes"): the
        value vectors times the post-MLP norm's gain, or the value vectors themselves (a view)
        where the MLP output joins the residual stream as it is."""
        gain = self.post_mlp_norm_gain(layer)
        values = self.value_vectors(layer)
        if gain is None:
            return values
        return values * gain.to(values.dtype)

    def paths(self) -> dict[str, str]:
        """Where the parts live, as attribute paths from the causal LM (``{l}``: a layer)."""
        fam = self.family
        mlp = f"{fam.layers}[{{l}}].{fam.mlp}"
        out = {
            "hook point (input of)": f"{mlp}.{fam.out_proj}",
            "value vectors": f"{mlp}.{fam.out_proj}.weight"
            + (" rows" if fam.conv1d else " columns"),
            "key vectors": f"{mlp}.{fam.key_proj}.weight"
            + (" columns" if fam.conv1d else " rows")
            + (" [0, d_mlp) (the gate half)" if fam.fused_gate_up else ""),
        }
        if fam.up_proj is not None:
            out["up vectors"] = f"{mlp}.{fam.up_proj}.weight rows"
        if fam.post_mlp_norm is not None:
            out["post-MLP norm"] = f"{fam.layers}[{{l}}].{fam.post_mlp_norm}"
        out["embeddings"] = f"{fam.embed}.weight"
        out["final norm"] = fam.final_norm
        return out

    def final_norm(self) -> nn.Module:
        """The norm applied to the last residual stream before unembedding."""
        return _get(self.model, self.family.final_norm)

    def final_norm_gain(self) -> torch.Tensor | None:
        """``[d_model]``: the final norm's per-channel gain (Gemma: ``1 + weight``), or None for
        a norm without one (OLMo-1's non-parametric LayerNorm)."""
        weight = getattr(self.final_norm(), "weight", None)
        return None if weight is None else weight + self.family.norm_gain_offset
