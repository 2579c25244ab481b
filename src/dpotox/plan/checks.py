"""Checks of a config that the schema cannot express: relations between keys, and counts
against the model's size. :func:`dpotox.plan.config.validate_config` runs them, so
``dpotox check-config`` and the Snakefile refuse the same configs with the same messages,
before any job starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Counts of neurons that must not exceed the model's MLP neurons: config key -> where it is.
_COUNT_KEYS = (
    ("sweeps", "ablate_toxic"),
    ("sweeps", "ablate_toxic_positive"),
    ("sweeps", "patch_toxic"),
    ("sweeps", "scale_keys_top"),
    ("neurons", "ablate_top_n"),
)
# GPT-2 names its sizes differently; its MLP is 4 x the width unless n_inner says otherwise.
_LAYERS = ("num_hidden_layers", "n_layer")
_WIDTH = ("hidden_size", "n_embd")
_MLP = ("intermediate_size", "n_inner")


def _first(arch: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    return next((arch[n] for n in names if arch.get(n) is not None), None)


def model_neurons(config: Mapping[str, Any], model: str) -> tuple[int, str] | None:
    """``(layers x MLP width, where it was read)`` for ``model``: from ``models.<model>.arch``
    if it gives them (the user's declaration: every job plans from it), else from the prepared
    folder's ``source.json`` once it exists; None if neither says. A prepared model that does
    not match its arch is reported by rule prepare_model."""
    mcfg = config["models"][model]
    arch = mcfg.get("arch") or {}
    layers, width, mlp = _first(arch, _LAYERS), _first(arch, _WIDTH), _first(arch, _MLP)
    if mlp is None and width is not None and mcfg["family"] == "gpt2":
        mlp = 4 * width
    if isinstance(layers, int) and isinstance(mlp, int):
        return layers * mlp, f"models.{model}.arch"
    prepared = Path("resources/models") / model / "base" / "source.json"
    if prepared.is_file():
        try:
            meta = json.loads(prepared.read_text())
            return int(meta["n_layers"]) * int(meta["d_mlp"]), str(prepared)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file: rule prepare_model rewrites it
    return None


def _arch_problems(model: str, arch: Mapping[str, Any]) -> list[str]:
    """Size fields that cannot describe a model (the meta-device count catches the rest)."""
    key = f"models.{model}.arch"
    problems = []
    for name, value in arch.items():
        if name.startswith(("num_", "n_", "hidden_size", "intermediate_size", "head_dim", "vocab")):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                problems.append(
                    f"config key '{key}.{name}': got {value!r}, expected a positive integer "
                    "(copy it from the model's config.json)"
                )
    heads = arch.get("num_attention_heads", arch.get("n_head"))
    kv = arch.get("num_key_value_heads")
    width = _first(arch, _WIDTH)
    if isinstance(heads, int) and isinstance(kv, int) and heads > 0 and kv > 0 and heads % kv:
        problems.append(
            f"config key '{key}.num_key_value_heads': {kv} does not divide "
            f"num_attention_heads ({heads})"
        )
    if (
        isinstance(heads, int)
        and isinstance(width, int)
        and heads > 0
        and width > 0
        and arch.get("head_dim") is None
        and width % heads
    ):
        problems.append(
            f"config key '{key}': the width {width} is not a multiple of the {heads} attention "
            "heads; give head_dim, or check the sizes against config.json"
        )
    return problems


def relation_problems(config: Mapping[str, Any]) -> list[str]:
    """One message per relation between keys that does not hold, in a config the schema
    accepted (defaults filled)."""
    from dpotox.plan.conditions import SweepError, sweep_conditions

    problems: list[str] = []
    problems += _alignment_problems(config)
    cluster = config["cluster"]
    if cluster["min_runtime"] > cluster["max_runtime"]:
        problems.append(
            f"config key 'cluster.min_runtime': {cluster['min_runtime']} is above "
            f"cluster.max_runtime ({cluster['max_runtime']}); the maximum would silently win"
        )
    method = config["dpo"]["pairs"]["method"]
    if method == "jsonl" and not config["data"].get("pairs"):
        problems.append(
            "config key 'dpo.pairs.method' is jsonl, which reads data.pairs, but data.pairs is "
            "not set; give data.pairs (a JSONL file of prompt/chosen/rejected) or another method"
        )
    ev = config["evaluation"]
    if "generation" in ev["ppl_variants"] and ev["ppl_context_tokens"] >= ev["ppl_window"]:
        problems.append(
            f"config key 'evaluation.ppl_context_tokens': {ev['ppl_context_tokens']} tokens of "
            f"unedited context leave nothing to score in windows of evaluation.ppl_window "
            f"({ev['ppl_window']}); lower it or raise ppl_window"
        )
    pairs_scorer, scorer = config["dpo"]["pairs"]["scorer"], config["toxicity"]["scorer"]
    if pairs_scorer == scorer and not config["dpo"]["pairs"]["same_scorer"]:
        problems.append(
            f"config key 'dpo.pairs.scorer': {pairs_scorer} is also toxicity.scorer, so DPO would "
            "be evaluated by the scorer its pairs were chosen by; choose another scorer for one "
            "of them (offline: jigsaw-bilstm, tcc-bilstm), or set dpo.pairs.same_scorer: true "
            "to accept it"
        )
    if config["probe"]["continuations"] and method != "best-of-n":
        why = (
            "makes its pairs with the probe, so the probe cannot learn from them"
            if method == "steered"
            else "reads its pairs from data.pairs, which are not the model's own text"
        )
        problems.append(
            f"config key 'probe.continuations' is true, but dpo.pairs.method {method} {why}; "
            "set probe.continuations: false or dpo.pairs.method: best-of-n"
        )
    for model, mcfg in config["models"].items():
        try:
            sweep_conditions(config, model)
        except SweepError as e:
            problems.append(str(e))
        problems += _arch_problems(model, mcfg.get("arch") or {})
        size = model_neurons(config, model)
        if size is None:
            continue
        total, where = size
        for section, name in _COUNT_KEYS:
            values = config[section][name]
            for n in values if isinstance(values, list) else [values]:
                if n > total:
                    problems.append(
                        f"config key '{section}.{name}': {n} neurons asked for, but model "
                        f"{model!r} has {total} MLP neurons ({where}); give at most {total}"
                    )
    return list(dict.fromkeys(problems))


def rows_needed(config: Mapping[str, Any], dataset: str) -> tuple[int, str] | None:
    """``(rows, why)``: the fewest rows the prepared table ``dataset`` must hold for later
    rules, checked when the table is written, before any model job; None if any will do."""
    n_eval = config["evaluation"]["n_prompts"]
    pairs_from_prompts = config["dpo"]["pairs"]["method"] == "best-of-n" and not config["data"].get(
        "pair_prompts"
    )
    if dataset == "prompts" and pairs_from_prompts:
        return n_eval + 1, (
            f"make_pairs samples DPO pairs from the prompts after the first "
            f"evaluation.n_prompts ({n_eval}), so the prompts table needs more than {n_eval} "
            "rows; add prompt sources (data.prompts), give data.pair_prompts, or lower "
            "evaluation.n_prompts"
        )
    return None


def _alignment_problems(config: Mapping[str, Any]) -> list[str]:
    """The alignment runs can be named and every method's settings hold for every model."""
    from dpotox.errors import ConfigError
    from dpotox.plan.alignment import alignment_runs, methods_section, run_patches
    from dpotox.plan.conditions import Patching, sweep_conditions, try_parse
    from dpotox.plan.training import DPOSettings

    try:
        runs = alignment_runs(config)
    except ConfigError as e:
        return [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]]
    out = []
    if len(runs) > 1:
        for patch in run_patches(config):
            c = try_parse(patch)
            if not isinstance(c, Patching) or c.name != Patching(c.neurons).name:
                out.append(
                    f"config key 'alignment.patch': {patch.removeprefix('patch-')!r} is not a "
                    "patch set (toxic-N, toxic-interpretable, tp, tp-an, tp-an-tn, four-groups, "
                    "all, increased)"
                )
                continue
            for model in config["models"]:
                if patch not in sweep_conditions(config, model):
                    out.append(
                        f"config key 'alignment.patch': {patch} is not among model {model!r}'s "
                        "sweep conditions, so DPO's row would have nothing to compare with; add "
                        "the set to sweeps.patch_toxic or sweeps.patch_sets, or drop it here"
                    )
    for method in methods_section(config):
        for model in config["models"]:
            try:
                DPOSettings.from_config(config, model, method)
            except ConfigError as e:
                msg = str(e).removeprefix("invalid DPO settings:").strip().lstrip("- ")
                out.append(f"method {method!r}, model {model!r}: {msg}")
                break
    return out
