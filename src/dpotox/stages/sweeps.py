"""The papers' conditions as intervention specs, from config grids (docs/design.md).

Every condition of Yang et al. 2024 workshop's Table 1 and Yang et al. 2025's Tables 2, 3, 12
and 19 is a named :class:`~dpotox.engine.spec.Intervention` built from the neuron table, the
probe and the activation caches, and evaluated like any other condition. What a name means is
in :mod:`dpotox.plan.conditions`; :func:`make_spec` builds the spec of a parsed name.

Patching and editing act at the generation positions (the last prompt position and every
generated one), as in the papers; steering acts at every position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from dpotox.engine.arch import Adapter
from dpotox.engine.spec import AddResidual, Intervention, ScaleKeys, ScaleNeurons, SetNeurons

# The condition names and the grid they come from live apart, importable without torch: the
# Snakefile plans with them.
from dpotox.plan.conditions import (
    GROUP_SETS,
    HALVES,
    SELECTIONS,
    Ablation,
    Editing,
    KeyScaling,
    Patching,
    Steering,
    SweepError,
    SweepsConfig,
    parse,
    prompt_halves,
)
from dpotox.stages.activations import prompt_means, read_meta
from dpotox.stages.evaluate import EvalConfig
from dpotox.stages.neurons import (
    neuron_vectors,
    refit,
    sign_groups,
    table_decomposition,
    toxic_ablation,
    unit,
    value_geometry,
)
from dpotox.stages.probe import load_probe, top_tokens_batch

log = logging.getLogger("dpotox")

# -- neuron sets -------------------------------------------------------------------------------


def _by_layer(
    rows: pd.DataFrame, values: np.ndarray | None = None
) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """``(layer, neurons, values)`` per layer, neurons ascending."""
    rows = rows.assign(_v=values if values is not None else 0.0).sort_values(["layer", "neuron"])
    return [
        (
            int(layer),
            g["neuron"].to_numpy(np.int64),
            g["_v"].to_numpy() if values is not None else None,
        )
        for layer, g in rows.groupby("layer", sort=True)
    ]


def top_by(neurons: pd.DataFrame, n: int, column: str, *, ascending: bool = False) -> pd.DataFrame:
    """The ``n`` rows with the largest ``column`` (smallest with ``ascending``); ties keep
    (layer, neuron) order, as the table's ranks do."""
    return neurons.sort_values(column, ascending=ascending, kind="stable").head(n)


def _check_n(neurons: pd.DataFrame, n: int, key: str) -> None:
    if not 1 <= n <= len(neurons):
        raise SweepError(
            f"config key 'sweeps.{key}': {n} neurons asked for, but the model has "
            f"{len(neurons)}; give a number from 1 to {len(neurons)}"
        )


def patch_set(
    neurons: pd.DataFrame, name: str, interpretable: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The rows of ``neurons`` that patch set ``name`` patches (see module doc)."""
    if name == "all":
        return neurons
    if name in GROUP_SETS:
        return neurons[neurons["group"].isin(GROUP_SETS[name])]
    if name == "toxic-interpretable":
        if interpretable is None:
            raise SweepError("patch set toxic-interpretable needs the judged value vectors")
        return interpretable
    if name.startswith("toxic-") and name[6:].isdigit():
        _check_n(neurons, int(name[6:]), "patch_toxic")
        return top_by(neurons, int(name[6:]), "cos")
    raise SweepError(
        f"config key 'sweeps.patch_sets': unknown patch set {name!r}; choose from "
        f"{', '.join([*GROUP_SETS, 'all'])}"
    )


def patch(name: str, rows: pd.DataFrame, description: str, *, means: str = "dpo") -> Intervention:
    """Set each neuron of ``rows`` to its DPO mean activation (``mbar_dpo``), or with ``means``
    ``"base"`` to its base mean (``mbar_base``: the control)."""
    edits = [
        SetNeurons(layer, torch.from_numpy(idx), torch.from_numpy(vals.copy()))
        for layer, idx, vals in _by_layer(rows, rows[f"mbar_{means}"].to_numpy())
    ]
    return Intervention(name, edits, description)


def patch_per_prompt(
    name: str, rows: pd.DataFrame, dpo_acts: str | Path, description: str
) -> Intervention:
    """Set each neuron of ``rows`` to the DPO model's mean activation over that prompt's own
    generation positions (one row of values per prompt, from the DPO activation cache)."""
    edits = []
    for layer, idx, _ in _by_layer(rows):
        ids, means, _ = prompt_means(dpo_acts, layer)
        edits.append(
            SetNeurons(
                layer,
                torch.from_numpy(idx),
                torch.from_numpy(means[:, idx].astype(np.float32)),
                prompt_ids=tuple(ids),
            )
        )
    return Intervention(name, edits, description)


def positive_toxic(neurons: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` most toxic-aligned neurons among those with a positive base mean activation."""
    pos = neurons[neurons["mbar_base"] > 0]
    _check_n(pos, n, "ablate_toxic_positive")
    return top_by(pos, n, "cos")


def edit_selection(
    neurons: pd.DataFrame,
    cos: np.ndarray,
    beta: float,
    selection: str,
    *,
    quantile: float | None = None,
) -> pd.DataFrame:
    """Activation editing's neurons: in each sign(cos) x sign(base activation) group, the
    fraction ``beta`` with the largest |cos| (``cos``), the smallest |activation| (``act``), or
    in the reference notebook's order (``ref``: the largest |cos| in TP and AN, the smallest in
    AP and TN; groups by strict signs, the count rounded down, as it computed them).
    ``quantile``: first drop the neurons whose base mean is above that quantile of all neurons'
    (the reference's GPT-2 notebook: 0.8). Returns the chosen rows with ``factor_sign`` =
    sign(cos) * sign(activation)."""
    if selection not in SELECTIONS:
        raise SweepError(
            f"config key 'sweeps.edit_selections': {selection!r} is not one of "
            f"{', '.join(SELECTIONS)}"
        )
    if not 0 < beta <= 1:
        raise SweepError(f"activation editing: beta {beta} is not a fraction in (0, 1]")
    df = neurons[["layer", "neuron", "mbar_base", "proj_base"]].assign(
        _cos=cos.ravel(), _group=sign_groups(cos.ravel(), neurons["mbar_base"].to_numpy())
    )
    if quantile is not None:
        df = df[df["mbar_base"] <= df["mbar_base"].quantile(quantile)]
    if selection == "ref":
        df = df[(df["_cos"] != 0) & (df["mbar_base"] != 0)]
    chosen = []
    for group, g in df.groupby("_group", sort=True):
        if selection == "ref":
            ascending = group in ("AP", "TN")
            key = -g["_cos"].abs() if ascending else g["_cos"].abs()
            k = int(beta * len(g))
        else:
            key = g["_cos"].abs() if selection == "cos" else -g["mbar_base"].abs()
            k = int(beta * len(g) + 0.5)  # half up: 0.5 of one neuron is that neuron
        chosen.append(
            g.assign(_key=key).sort_values("_key", ascending=False, kind="stable").head(k)
        )
    out = pd.concat(chosen)
    out["factor_sign"] = np.where(out["_cos"] > 0, 1.0, -1.0) * np.where(
        out["mbar_base"] >= 0, 1.0, -1.0
    )
    return out


def edit(
    name: str,
    neurons: pd.DataFrame,
    cos: np.ndarray,
    beta: float,
    alpha: float,
    selection: str,
    description: str,
    *,
    operation: str = "scale",
    quantile: float | None = None,
) -> Intervention:
    """Activation editing of the neurons :func:`edit_selection` chooses: toxic-aligned writes
    shrink, anti-toxic ones grow. ``scale``: multiply the live activation by
    ``1 - alpha * sign(cos) * sign(activation)``; ``const`` (the reference notebook's): set it
    to the base mean times that factor. The spec's ``meta`` holds the edit's projected
    reduction along the probe, ``sum_i alpha * factor_sign_i * proj_base_i``, beside DPO's net
    reduction (the neuron table's summed ``delta``), so a table can tell whether the edit is as
    strong as DPO's shift."""
    limit_ok = 0 < alpha < 1 if operation == "scale" else 0 < alpha <= 1
    if not limit_ok:
        raise SweepError(
            f"activation editing ({operation}): alpha {alpha} must be in "
            + (
                "(0, 1) (a factor 1 - alpha at or below 0 would flip or zero the neurons)"
                if operation == "scale"
                else "(0, 1] (beyond 1 the factor flips the sign)"
            )
        )
    rows = edit_selection(neurons, cos, beta, selection, quantile=quantile)
    factors = 1.0 - alpha * rows["factor_sign"].to_numpy()
    if operation == "scale":
        edits = [
            ScaleNeurons(layer, torch.from_numpy(idx), torch.from_numpy(vals.copy()))
            for layer, idx, vals in _by_layer(rows, factors)
        ]
    elif operation == "const":
        values = rows["mbar_base"].to_numpy() * factors
        edits = [
            SetNeurons(layer, torch.from_numpy(idx), torch.from_numpy(vals.copy()))
            for layer, idx, vals in _by_layer(rows, values)
        ]
    else:
        raise SweepError(f"activation editing: unknown operation {operation!r}")
    meta = {
        "n_neurons": len(rows),
        "projected_reduction": float((alpha * rows["factor_sign"] * rows["proj_base"]).sum()),
        "dpo_net_reduction": float(neurons["delta"].sum()),
    }
    return Intervention(name, edits, description, meta=meta)


# -- directions --------------------------------------------------------------------------------


def word_contrast(
    adapter: Adapter, tok: PreTrainedTokenizerBase, toxic: Sequence[str], neutral: Sequence[str]
) -> torch.Tensor:
    """Mean input embedding of the ``toxic`` words minus that of the ``neutral`` words (the
    probe-free direction). A word is embedded as it appears mid-sentence (with a leading
    space) and, if it splits into several tokens, as the mean of their embeddings."""
    emb = adapter.input_embedding().detach().double().cpu()

    def mean(words: Sequence[str], key: str) -> torch.Tensor:
        if not words:
            raise SweepError(f"config key 'sweeps.{key}' is empty; give at least one word")
        vecs = []
        for w in words:
            ids = tok(" " + w.strip(), add_special_tokens=False)["input_ids"]
            if not ids:
                raise SweepError(f"config key 'sweeps.{key}': {w!r} tokenises to nothing")
            vecs.append(emb[ids].mean(0))
        return torch.stack(vecs).mean(0)

    return mean(toxic, "toxic_words") - mean(neutral, "neutral_words")


def interpretable_toxic(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    candidates: pd.DataFrame,
    score: Any,
    *,
    n_tokens: int,
    threshold: float,
    decomposition: str = "exact",
    final_gain: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``candidates`` whose value vector (under ``decomposition``:
    :func:`dpotox.stages.neurons.neuron_vectors`) has a toxic token among its ``n_tokens``
    nearest unembedded tokens, a token being toxic if ``score`` (the toxicity scorer) gives its
    text at least ``threshold``. Returns ``(chosen rows, judged tokens table)``."""
    vectors = torch.stack(
        [
            neuron_vectors(adapter, int(r.layer), decomposition)[int(r.neuron)]
            for r in candidates.itertuples()
        ]
    )
    lists = top_tokens_batch(adapter, tok, vectors, n_tokens, final_gain=final_gain)
    texts = sorted({t.strip() for toks in lists for t, _ in toks if t.strip()})
    judged = dict(zip(texts, map(float, score(texts)), strict=True)) if texts else {}
    rows, keep = [], []
    for r, toks in zip(candidates.itertuples(), lists, strict=True):
        toxic = [t for t, _ in toks if judged.get(t.strip(), 0.0) >= threshold]
        keep.append(bool(toxic))
        rows.append(
            {
                "layer": int(r.layer),
                "neuron": int(r.neuron),
                "cos": float(r.cos),
                "top_tokens": [t for t, _ in toks],
                "toxic_tokens": toxic,
            }
        )
    return candidates[np.asarray(keep, dtype=bool)], pd.DataFrame(rows)


# -- the rule ----------------------------------------------------------------------------------


def build_specs(
    *,
    neurons_path: str | Path,
    model_dir: str | Path,
    probe_path: str | Path,
    dpo_acts: str | Path,
    cfg: Mapping[str, Any],
    conditions: Sequence[str],
    out_dir: str | Path,
    judged_path: str | Path | None = None,
    base_acts: str | Path | None = None,
) -> dict[str, int]:
    """Rule ``sweep_specs``: write ``{out_dir}/{condition}.json`` for every condition in
    ``conditions`` (names as :func:`spec_conditions` makes them); returns neurons per spec.

    Every spec is built before the first is written, so a bad setting leaves no file.
    """
    from dpotox.scoring import load_scorer
    from dpotox.sources.models import load_prepared

    sc = SweepsConfig.from_config(cfg)
    t0 = time.perf_counter()
    neurons = pd.read_parquet(neurons_path).sort_values(["layer", "neuron"]).reset_index(drop=True)
    model, tok = load_prepared(model_dir, device="cpu")
    adapter = Adapter(model)
    total = adapter.n_layers * adapter.d_mlp
    if len(neurons) != total:
        raise SweepError(
            f"{neurons_path} has {len(neurons)} neurons but {model_dir} has {total} "
            "(layers x d_mlp): the neuron table is of another model"
        )
    w, _ = load_probe(probe_path, adapter.d_model)
    cos_probe = neurons["cos"].to_numpy().reshape(adapter.n_layers, adapter.d_mlp)
    # The neuron table's (tables made before the option were naive).
    decomposition = table_decomposition(neurons_path)
    meta = read_meta(dpo_acts)
    log.info("DPO activation cache %s: %d prompts", dpo_acts, meta["n_prompts"])

    interpretable, judged = None, None
    parsed = [parse(c) for c in conditions]
    if any(isinstance(c, Patching) and c.neurons == "toxic-interpretable" for c in parsed):
        scorer = load_scorer(cfg.get("toxicity", {}), device="cpu")
        pool = max(sc.patch_toxic) if sc.patch_toxic else 256
        interpretable, judged = interpretable_toxic(
            adapter,
            tok,
            top_by(neurons, pool, "cos"),
            scorer.score,
            n_tokens=sc.interpretable_tokens,
            threshold=sc.interpretable_threshold,
            decomposition=decomposition,
            final_gain=bool((cfg.get("neurons") or {}).get("lens_final_gain", True)),
        )
        log.info(
            "interpretable toxic neurons: %d of the top %d by cosine (scorer %s)",
            len(interpretable),
            pool,
            scorer.name,
        )
    fits = {}
    halves_needed = sorted({c.fit for c in parsed if isinstance(c, Patching) and c.fit in HALVES})
    if halves_needed:
        if base_acts is None:
            raise SweepError("cross-fitted patches (patch-SET-fit-a/b) need the base cache")
        ids = prompt_means(dpo_acts, 0)[0]
        halves = dict(
            zip(HALVES, prompt_halves(ids, EvalConfig.from_config(cfg).seed), strict=True)
        )
        for h in halves_needed:
            fits[h] = refit(neurons, base_acts, dpo_acts, halves[h], decomposition)
            log.info(
                "fit on half %s (%d prompts): %d neurons reduce their projection",
                h,
                len(halves[h]),
                int((fits[h]["delta"] > 0).sum()),
            )
    cos_free = None
    if any(isinstance(c, Editing) and c.direction == "free" for c in parsed):
        contrast = word_contrast(adapter, tok, sc.toxic_words, sc.neutral_words)
        cos_free = value_geometry(adapter, contrast, decomposition).cos
        log.info("probe-free direction: cos with the probe %.3f", float(unit(contrast) @ unit(w)))

    specs = [
        make_spec(
            c,
            neurons,
            sc,
            adapter=adapter,
            w=w,
            cos_probe=cos_probe,
            cos_free=cos_free,
            interpretable=interpretable,
            dpo_acts=dpo_acts,
            fits=fits,
        )
        for c in conditions
    ]
    out_dir = Path(out_dir)
    for spec in specs:
        spec.save(out_dir / f"{spec.name}.json")
    if judged_path is not None and judged is not None:
        from dpotox.io import write_parquet

        write_parquet(judged, judged_path, metadata={"dpotox.table": "interpretable_toxic"})
    counts = {s.name: s.n_neurons for s in specs}
    log.info("wrote %d specs to %s in %.1f s", len(specs), out_dir, time.perf_counter() - t0)
    return counts


def make_spec(
    name: str,
    neurons: pd.DataFrame,
    sc: SweepsConfig,
    *,
    adapter: Adapter,
    w: torch.Tensor,
    cos_probe: np.ndarray,
    cos_free: np.ndarray | None,
    interpretable: pd.DataFrame | None,
    dpo_acts: str | Path,
    fits: Mapping[str, pd.DataFrame] | None = None,
) -> Intervention:
    """The spec of one condition name (see :mod:`dpotox.plan.conditions`). ``fits``: the
    neuron table refitted on each half of the prompts (:func:`~dpotox.stages.neurons.refit`),
    for the cross-fitted patches."""
    match parse(name):
        case Ablation(n=n, positive=True) as c:
            rows = positive_toxic(neurons, n)
            where = "at the generated positions" if c.generation_only else "at every position"
            return Intervention(
                name,
                [
                    SetNeurons(layer, torch.from_numpy(idx), torch.tensor(0.0), where=c.where)
                    for layer, idx, _ in _by_layer(rows)
                ],
                f"the {n} most probe-aligned value vectors with a positive base "
                f"activation, set to 0 {where}",
            )
        case Ablation(n=n, generation_only=True):
            # The neuron table's cosine ranking, as toxic_ablation_spec's from the probe.
            return toxic_ablation(cos_probe, n, generation_only=True)
        case KeyScaling(top=k, factor=f):
            _check_n(neurons, k, "scale_keys_top")
            rows = top_by(neurons, k, "cos")
            return Intervention(
                name,
                [
                    ScaleKeys(layer, torch.from_numpy(idx), torch.tensor(f))
                    for layer, idx, _ in _by_layer(rows)
                ],
                f"the DPO model with the key vectors of the {k} most toxic-aligned "
                f"neurons scaled x{f:g}",
            )
        case Patching(neurons=set_name, fit=half) if half is not None:
            if fits is None or half not in fits:
                raise SweepError(
                    f"condition {name}: the neuron table was not fitted on half {half}"
                )
            # The set's neurons as the half's table picks them, their values from that table
            # (toxic-interpretable's judged rows carry the all-prompt means).
            keys = patch_set(fits[half], set_name, interpretable)[["layer", "neuron"]]
            rows = fits[half].merge(keys, on=["layer", "neuron"])
            return patch(
                name,
                rows,
                f"patch set {set_name} ({len(rows)} neurons) as fitted on half {half} of the "
                "prompts, set to that half's DPO mean activations",
            )
        case Patching(neurons=set_name, per_prompt=per_prompt, base_means=base_means):
            rows = patch_set(neurons, set_name, interpretable)
            what = f"patch set {set_name} ({len(rows)} neurons)"
            if base_means:
                return patch(
                    name,
                    rows,
                    f"{what} set to their base mean activations (control)",
                    means="base",
                )
            if per_prompt:
                return patch_per_prompt(
                    name, rows, dpo_acts, f"{what} set to each prompt's own DPO mean activations"
                )
            return patch(name, rows, f"{what} set to their DPO mean activations")
        case Steering(alpha=alpha):
            return Intervention(
                name,
                [AddResidual(adapter.n_layers - 1, unit(w).float(), -alpha, where="all")],
                f"subtract {alpha:g} x the unit probe direction after the last layer",
            )
        case Editing(direction=source, selection=selection, beta=beta, alpha=alpha) as c:
            cos = cos_probe if source == "probe" else cos_free
            if cos is None:
                raise SweepError(f"condition {name}: the probe-free direction was not computed")
            order = {
                "cos": "|cos|",
                "act": "ascending |activation|",
                "ref": "the reference's order",
            }[selection]
            const = c.operation == "const"
            quantile = sc.edit_constant_quantile if const else None
            return edit(
                name,
                neurons,
                cos,
                beta,
                alpha,
                selection,
                f"activation editing ({source}): fraction {beta:g} of each group by {order}"
                + (f" below the {quantile:g} quantile of base activation" if quantile else "")
                + (", set to base mean x 1 -/+ " if const else ", scaled by 1 -/+ ")
                + f"{alpha:g}",
                operation=c.operation,
                quantile=quantile,
            )
    raise SweepError(
        f"condition {name!r} is not built by rule sweep_specs (ablate-toxic-N is "
        "rule toxic_ablation_spec's; base and dpo are models)"
    )
