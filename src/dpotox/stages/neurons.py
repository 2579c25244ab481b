"""The neuron table: each MLP neuron's geometry against the probe and its projection before and
after DPO (docs/design.md, "Alignment, mean activation, projection"; Eq. 1/2 of the papers).

For neuron ``i`` of layer ``l`` with value vector ``v_i``, mean activation ``mbar_i`` (from the
activation caches) and the unit probe direction ``u = w / |w|``:

- ``cos = cos(v_i^base, w)``: toxic-aligned (T) if > 0, anti-toxic-aligned (A) otherwise;
- ``proj = mbar_i * (v_i . u)`` for the base and the DPO model;
- ``delta = proj_base - proj_dpo``: the reduction of the neuron's write along the probe;
- ``edit_group``: sign(cos) x sign(mbar^base) (P if >= 0, else N): TP, TN, AP, AN, the groups
  activation editing uses (no DPO needed);
- ``group``: the DPO-informed group: the edit group where ``delta > 0``, ``increased`` where
  the neuron's projection did not fall. The five labels partition all neurons.

Summed over a layer, ``sum_i proj_i + b . u`` (``b`` the output bias, GPT-2 only) is the
layer's mean MLP output projected on ``u``, because the MLP output is linear in ``m``.

What the layer writes (``neurons.decomposition``): families with a post-MLP norm (Gemma-2/3,
OLMo-2) add ``norm(y) = s * g * y`` to the residual stream, ``y = sum_i m_i v_i`` the MLP output,
``s`` the norm's per-token scale, ``g`` its gain. ``exact`` (default) takes ``v_i`` to be the
written vector ``g * v_i`` and ``mbar_i`` the mean of ``m_i * s`` (the cache's ``written``
column), so the projections sum to the layer's mean residual increment along ``u``; ``naive``
takes down_proj's columns and the mean of ``m_i``, as the papers did for GPT-2 and Llama (which
have no such norm, so both are the same there). ``mbar_base`` and ``mbar_dpo`` are always the
means of ``m`` itself: the values patching sets; ``wbar_base`` and ``wbar_dpo`` are the written
means the projections use (equal to ``mbar`` under ``naive`` and for families without the
norm). :func:`decomposition_frame` compares the two decompositions neuron by neuron.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from dpotox.engine.arch import Adapter
from dpotox.engine.spec import Intervention, ablate
from dpotox.errors import NeuronsError
from dpotox.io import write_parquet
from dpotox.plan.conditions import INCREASED, Ablation
from dpotox.plan.config import section_settings
from dpotox.stages.activations import mean_activations, read_meta
from dpotox.stages.probe import load_probe, top_tokens_batch

log = logging.getLogger("dpotox")


@dataclass
class NeuronsConfig:
    """The ``neurons`` section of the config (defaults and bounds: the schema)."""

    top_k_tokens: int = 20
    n_tokens: int = 10
    ablate_top_n: int = 200
    rank_top: int = 10000
    rank_bin: int = 500
    decomposition: str = "exact"
    compare_top: int = 256
    lens_final_gain: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> NeuronsConfig:
        return section_settings(cls, cfg, "neurons")


@dataclass
class ValueGeometry:
    """Per-neuron geometry of one model's value vectors against a probe (float64,
    ``[L, d_mlp]``)."""

    along: np.ndarray  # v_i . u: what a unit activation writes along the probe direction
    norm: np.ndarray  # |v_i|
    cos: np.ndarray  # cos(v_i, w)
    bias_along: np.ndarray  # [L]: b . u, the output bias's write along u (0 without a bias)


def unit(w: torch.Tensor) -> torch.Tensor:
    """``w / |w|`` in float64."""
    w = w.detach().double().cpu()
    return w / w.norm()


EXACT, NAIVE = "exact", "naive"


def neuron_vectors(adapter: Adapter, layer: int, decomposition: str = EXACT) -> torch.Tensor:
    """``[d_mlp, d_model]``: each neuron's write per unit of its activation under
    ``decomposition`` (module doc): the written vectors (``exact``) or the value vectors
    (``naive``); the same for families without a post-MLP norm."""
    if decomposition == EXACT:
        return adapter.written_vectors(layer)
    if decomposition == NAIVE:
        return adapter.value_vectors(layer)
    raise NeuronsError(
        f"config key 'neurons.decomposition': unknown value {decomposition!r}; use "
        f"{EXACT!r} or {NAIVE!r}"
    )


def value_geometry(adapter: Adapter, w: torch.Tensor, decomposition: str = EXACT) -> ValueGeometry:
    """The neurons' write vectors (:func:`neuron_vectors`): projections, norms and cosines
    against probe weight ``w``."""
    u = unit(w)
    along, norm, cos, bias = [], [], [], []
    for layer in range(adapter.n_layers):
        v = neuron_vectors(adapter, layer, decomposition).detach().double().cpu()
        a = v @ u
        n = v.norm(dim=1)
        along.append(a)
        norm.append(n)
        cos.append(a / n.clamp_min(torch.finfo(torch.float64).tiny))
        b = adapter.out_bias(layer)
        gain = adapter.post_mlp_norm_gain(layer) if decomposition == EXACT else None
        if b is not None and gain is not None:
            # Scaled per token like the neurons' writes; no family has both, so the mean scale
            # is not kept for it.
            raise NeuronsError(
                "a post-MLP norm after a biased output projection is not supported by the "
                "exact decomposition; use neurons.decomposition: naive"
            )
        bias.append(float(b.detach().double().cpu() @ u) if b is not None else 0.0)
    return ValueGeometry(
        torch.stack(along).numpy(),
        torch.stack(norm).numpy(),
        torch.stack(cos).numpy(),
        np.asarray(bias),
    )


def table_decomposition(neurons_path: str | Path) -> str:
    """The decomposition a ``neurons.parquet`` was computed under (its metadata); tables
    written before ``neurons.decomposition`` existed used down_proj's columns: ``naive``."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(neurons_path).metadata or {}
    return meta.get(b"dpotox.decomposition", NAIVE.encode()).decode()


def value_cosines(base: Adapter, dpo: Adapter, decomposition: str = EXACT) -> np.ndarray:
    """``[L, d_mlp]``: cos(v_i^base, v_i^dpo), neuron by neuron (:func:`neuron_vectors`)."""
    out = []
    for layer in range(base.n_layers):
        a = neuron_vectors(base, layer, decomposition).detach().double().cpu()
        b = neuron_vectors(dpo, layer, decomposition).detach().double().cpu()
        out.append(torch.nn.functional.cosine_similarity(a, b, dim=1))
    return torch.stack(out).numpy()


def sign_groups(cos: np.ndarray, act: np.ndarray) -> np.ndarray:
    """TP/TN/AP/AN by sign(cos) (T if > 0) and sign of the base activation (P if >= 0)."""
    return np.char.add(np.where(cos > 0, "T", "A"), np.where(act >= 0, "P", "N")).astype(object)


def neuron_frame(
    base: ValueGeometry,
    dpo: ValueGeometry,
    cos_base_dpo: np.ndarray,
    mbar_base: np.ndarray,
    mbar_dpo: np.ndarray,
    wbar_base: np.ndarray | None = None,
    wbar_dpo: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per neuron (layer-major): the columns of ``neurons.parquet`` (see module doc).
    ``wbar_*``: the written means the projections use (default: ``mbar_*``)."""
    wbar_base = mbar_base if wbar_base is None else wbar_base
    wbar_dpo = mbar_dpo if wbar_dpo is None else wbar_dpo
    shape = base.along.shape
    for name, arr in (
        ("DPO value vectors", dpo.along),
        ("base mean activations", mbar_base),
        ("DPO mean activations", mbar_dpo),
        ("base written means", wbar_base),
        ("DPO written means", wbar_dpo),
        ("cos(v_base, v_dpo)", cos_base_dpo),
    ):
        if arr.shape != shape:
            raise NeuronsError(
                f"{name} have shape {arr.shape}, but the base model's value "
                f"vectors {shape} (layers x neurons): the inputs are of different models"
            )
    n_layers, d_mlp = shape
    proj_base = wbar_base * base.along
    proj_dpo = wbar_dpo * dpo.along
    delta = proj_base - proj_dpo
    # The sign of what the neuron writes (s > 0, so the same as m's except where a neuron's
    # mean changes sign once weighted by the scale).
    edit = sign_groups(base.cos, wbar_base)
    df = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(n_layers, dtype=np.int32), d_mlp),
            "neuron": np.tile(np.arange(d_mlp, dtype=np.int32), n_layers),
            "cos": base.cos.ravel(),
            "cos_dpo": dpo.cos.ravel(),
            "norm_base": base.norm.ravel(),
            "norm_dpo": dpo.norm.ravel(),
            "cos_base_dpo": cos_base_dpo.ravel(),
            "along_base": base.along.ravel(),
            "along_dpo": dpo.along.ravel(),
            "mbar_base": mbar_base.ravel(),
            "mbar_dpo": mbar_dpo.ravel(),
            "wbar_base": wbar_base.ravel(),
            "wbar_dpo": wbar_dpo.ravel(),
            "shift": (wbar_dpo - wbar_base).ravel(),
            "proj_base": proj_base.ravel(),
            "proj_dpo": proj_dpo.ravel(),
            "delta": delta.ravel(),
            "group": np.where(delta.ravel() > 0, edit.ravel(), INCREASED),
            "edit_group": edit.ravel(),
        }
    )
    # Rank 1 is the largest reduction / the most toxic-aligned value vector; ties keep the
    # (layer, neuron) order, so ranks are a permutation.
    df["rank_delta"] = df["delta"].rank(ascending=False, method="first").astype(np.int64)
    df["rank_cos"] = df["cos"].rank(ascending=False, method="first").astype(np.int64)
    return df


def refit(
    neurons: pd.DataFrame,
    base_acts: str | Path,
    dpo_acts: str | Path,
    prompts: Collection[str],
    decomposition: str = EXACT,
) -> pd.DataFrame:
    """The neuron table as if only ``prompts`` had been evaluated (cross-fitting): the value
    geometry (cosines, writes along the probe) is kept, and the mean activations, projections,
    reductions, groups and ranks are recomputed from these prompts' cached positions.
    ``neurons``: a table of :func:`neuron_frame` in layer-major order; ``decomposition``: the
    one it was built under (:func:`table_decomposition`)."""
    n_layers = int(neurons["layer"].max()) + 1
    shape = (n_layers, len(neurons) // n_layers)

    def col(name: str) -> np.ndarray:
        return neurons[name].to_numpy(np.float64).reshape(shape)

    def geometry(side: str) -> ValueGeometry:
        cos = col("cos" if side == "base" else "cos_dpo")
        return ValueGeometry(col(f"along_{side}"), col(f"norm_{side}"), cos, np.zeros(n_layers))

    means = {}
    for side, path in (("base", base_acts), ("dpo", dpo_acts)):
        m = mean_activations(path, prompts=prompts)
        written = decomposition == EXACT and read_meta(path).get("written", False)
        means[side] = (m, mean_activations(path, written=True, prompts=prompts) if written else m)
    return neuron_frame(
        geometry("base"),
        geometry("dpo"),
        col("cos_base_dpo"),
        means["base"][0],
        means["dpo"][0],
        means["base"][1],
        means["dpo"][1],
    )


def layer_frame(base: ValueGeometry, dpo: ValueGeometry, neurons: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: the bias terms and the mean MLP output projected on ``u`` (base, DPO),
    and the layer's reduction split into the neurons that reduced and those that increased."""
    by = neurons.groupby("layer")
    pos = neurons["delta"].where(neurons["delta"] > 0, 0.0).groupby(neurons["layer"]).sum()
    neg = neurons["delta"].where(neurons["delta"] <= 0, 0.0).groupby(neurons["layer"]).sum()
    return pd.DataFrame(
        {
            "layer": np.arange(len(base.bias_along), dtype=np.int32),
            "bias_along_base": base.bias_along,
            "bias_along_dpo": dpo.bias_along,
            "mlp_proj_base": by["proj_base"].sum().to_numpy() + base.bias_along,
            "mlp_proj_dpo": by["proj_dpo"].sum().to_numpy() + dpo.bias_along,
            "reduction": by["delta"].sum().to_numpy() + base.bias_along - dpo.bias_along,
            "reduction_by_reducing": pos.to_numpy(),
            "increase_by_increasing": -neg.to_numpy(),
        }
    )


def top_cosine_neurons(cos: np.ndarray, n: int, *, anti: bool = False) -> list[tuple[int, int]]:
    """The ``n`` (layer, neuron) pairs with the largest cosine (smallest with ``anti``), best
    first."""
    flat = cos.ravel() if not anti else -cos.ravel()
    n = min(n, flat.size)
    # A stable sort keeps (layer, neuron) order among ties, as the table's ranks do.
    idx = np.argsort(-flat, kind="stable")[:n]
    d = cos.shape[1]
    return [(int(i // d), int(i % d)) for i in idx]


def toxic_ablation(cos: np.ndarray, n: int, *, generation_only: bool = False) -> Intervention:
    """Zero the ``n`` most toxic-aligned neurons (by cosine): their value vectors, i.e. at every
    position (the papers'), or with ``generation_only`` from the last prompt position on.

    Raises:
        NeuronsError: ``n`` is more than the model's neurons (a count silently cut to all of
            them would keep a name that says otherwise).
    """
    if not 1 <= n <= cos.size:
        raise NeuronsError(
            f"{Ablation(n)}: {n} neurons asked for, but the model has {cos.size} MLP neurons; "
            "lower sweeps.ablate_toxic / neurons.ablate_top_n to at most that"
        )
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in top_cosine_neurons(cos, n):
        by_layer.setdefault(layer, []).append(neuron)
    cond = Ablation(n, generation_only=generation_only)
    where = "at the generated positions" if generation_only else "at every position"
    return Intervention(
        cond.name,
        [ablate(layer, sorted(ns), where=cond.where) for layer, ns in sorted(by_layer.items())],
        f"the {n} value vectors most aligned with the probe, activations set to 0 {where}",
    )


def logit_lens(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    cos: np.ndarray,
    *,
    k: int,
    n_tokens: int,
    decomposition: str = EXACT,
    final_gain: bool = True,
) -> pd.DataFrame:
    """The top tokens of the ``k`` most toxic-aligned value vectors and of the ``k`` most
    anti-toxic ones, negated (the papers' Tables 14 and 15): the tokens whose unembedding has
    the largest dot product with the vector. ``cos``: ``[L, d_mlp]`` cos(v_i, w) of the
    adapter's vectors under ``decomposition`` (:class:`ValueGeometry`)."""
    rows = []
    for kind, anti in (("toxic", False), ("anti-toxic", True)):
        chosen = top_cosine_neurons(cos, k, anti=anti)
        vectors = torch.stack(
            [neuron_vectors(adapter, layer, decomposition)[i] for layer, i in chosen]
        )
        lists = top_tokens_batch(
            adapter, tok, -vectors if anti else vectors, n_tokens, final_gain=final_gain
        )
        for rank, ((layer, i), toks) in enumerate(zip(chosen, lists, strict=True), start=1):
            rows.append(
                {
                    "kind": kind,
                    "rank": rank,
                    "layer": layer,
                    "neuron": i,
                    "cos": float(cos[layer, i]),
                    "negated": anti,
                    "top_tokens": [t for t, _ in toks],
                }
            )
    return pd.DataFrame(rows)


def build_neuron_table(
    *,
    base_model: str | Path,
    dpo_model: str | Path,
    probe_path: str | Path,
    base_acts: str | Path,
    dpo_acts: str | Path,
    cfg: Mapping[str, Any],
    out_neurons: str | Path,
    out_layers: str | Path,
    out_tokens: str | Path,
    out_decomposition: str | Path | None = None,
) -> dict[str, Any]:
    """Rule ``neuron_table``: write ``neurons.parquet`` (under ``neurons.decomposition``),
    ``layers.parquet``, the logit-lens tokens and, given ``out_decomposition``, the two
    decompositions side by side (:func:`decomposition_frame`), all Parquet; returns a short
    summary for the log."""
    from dpotox.sources.models import load_prepared

    nc = NeuronsConfig.from_config(cfg)
    t0 = time.perf_counter()
    meta = {v: read_meta(p) for v, p in (("base", base_acts), ("dpo", dpo_acts))}
    if meta["base"]["n_prompts"] != meta["dpo"]["n_prompts"]:
        raise NeuronsError(
            f"the base cache {base_acts} holds {meta['base']['n_prompts']} prompts "
            f"but the DPO cache {dpo_acts} {meta['dpo']['n_prompts']}; cache both "
            "with the same evaluation settings"
        )
    base, tok = load_prepared(base_model, device="cpu")
    dpo, _ = load_prepared(dpo_model, device="cpu")
    a_base, a_dpo = Adapter(base), Adapter(dpo)
    if a_base.post_mlp_norm(0) is not None:
        for v, p in (("base", base_acts), ("dpo", dpo_acts)):
            if not meta[v].get("written"):
                raise NeuronsError(
                    f"{p} has no written activations (m times the post-MLP norm's scale), "
                    f"which the {a_base.family.name} model's exact decomposition needs: it was "
                    "cached by an older dpotox; rerun rule cache_activations"
                )
    w, _ = load_probe(probe_path, a_base.d_model)
    mbar = {v: mean_activations(p) for v, p in (("base", base_acts), ("dpo", dpo_acts))}
    # Both decompositions: the configured one is the table, the pair is compared.
    frames, geometry = {}, {}
    for d in (EXACT, NAIVE):
        written = d == EXACT
        g_base, g_dpo = value_geometry(a_base, w, d), value_geometry(a_dpo, w, d)
        geometry[d] = (g_base, g_dpo)
        frames[d] = neuron_frame(
            g_base,
            g_dpo,
            value_cosines(a_base, a_dpo, d),
            mbar["base"],
            mbar["dpo"],
            mean_activations(base_acts, written=written),
            mean_activations(dpo_acts, written=written),
        )
    neurons = frames[nc.decomposition]
    g_base, g_dpo = geometry[nc.decomposition]
    tokens = logit_lens(
        a_base,
        tok,
        g_base.cos,
        k=nc.top_k_tokens,
        n_tokens=nc.n_tokens,
        decomposition=nc.decomposition,
        final_gain=nc.lens_final_gain,
    )
    layers = layer_frame(g_base, g_dpo, neurons)
    common = {
        "dpotox.probe": str(probe_path),
        "dpotox.base_model": str(base_model),
        "dpotox.dpo_model": str(dpo_model),
        "dpotox.n_prompts": str(meta["base"]["n_prompts"]),
        "dpotox.decomposition": nc.decomposition,
        "dpotox.post_mlp_norm": str(a_base.family.post_mlp_norm),
    }
    write_parquet(
        neurons,
        out_neurons,
        metadata={
            "dpotox.table": "neurons",
            **common,
            "dpotox.description": "One row per MLP neuron; columns in docs/neurons.md "
            "(neurons.parquet).",
        },
    )
    write_parquet(
        layers,
        out_layers,
        metadata={
            "dpotox.table": "layers",
            **common,
            "dpotox.description": "One row per layer: bias terms and mean MLP output projected on "
            "the unit probe direction, base and DPO.",
        },
    )
    write_parquet(tokens, out_tokens, metadata={"dpotox.table": "value_vector_tokens", **common})
    if out_decomposition is not None:
        write_parquet(
            decomposition_frame(frames[EXACT], frames[NAIVE]),
            out_decomposition,
            metadata={
                "dpotox.table": "decomposition",
                **common,
                "dpotox.description": "One row per MLP neuron: cosine, reduction and group under "
                "the exact decomposition (what the layer writes) and the naive one (down_proj "
                "columns, as the papers); docs/neurons.md.",
            },
        )
    reducing = neurons["delta"] > 0
    return {
        "n_neurons": len(neurons),
        "n_reducing": int(reducing.sum()),
        "net_reduction": float(neurons["delta"].sum()),
        "seconds": time.perf_counter() - t0,
    }


def decomposition_frame(exact: pd.DataFrame, naive: pd.DataFrame) -> pd.DataFrame:
    """One row per neuron: ``cos``, ``delta``, ``group``, their ranks and the activation
    ``shift`` under each decomposition (suffixes ``_exact``, ``_naive``), from two
    :func:`neuron_frame` tables of the same models."""
    cols = [
        "cos",
        "delta",
        "group",
        "edit_group",
        "rank_delta",
        "rank_cos",
        "proj_base",
        "shift",
    ]
    out = exact[["layer", "neuron"]].copy()
    for name, df in (("exact", exact), ("naive", naive)):
        for c in cols:
            out[f"{c}_{name}"] = df[c].to_numpy()
    return out


def write_toxic_ablation(
    *,
    model_dir: str | Path,
    probe_path: str | Path,
    n: int,
    out: str | Path,
    cfg: Mapping[str, Any] | None = None,
) -> Intervention:
    """Rule ``toxic_ablation_spec``: write :func:`toxic_ablation` of the base model as a spec,
    ranking the neurons by cosine under ``neurons.decomposition``."""
    from dpotox.sources.models import load_prepared

    model, _ = load_prepared(model_dir, device="cpu")
    adapter = Adapter(model)
    total = adapter.n_layers * adapter.d_mlp
    if not 1 <= n <= total:
        raise NeuronsError(
            f"cannot ablate {n} neurons: the model has {total} "
            f"({adapter.n_layers} layers x {adapter.d_mlp}); lower neurons.ablate_top_n"
        )
    w, _ = load_probe(probe_path, adapter.d_model)
    decomposition = NeuronsConfig.from_config(cfg or {}).decomposition
    spec = toxic_ablation(value_geometry(adapter, w, decomposition).cos, n)
    spec.save(out)
    return spec
