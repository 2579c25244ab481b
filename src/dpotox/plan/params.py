"""What each rule passes to its jobs as ``params``: the config keys the job reads, and no more.

Snakemake reruns a job whose ``params`` changed (its ``params`` rerun trigger). A rule that
passed whole sections, or every model's entry, would rerun whenever anything in them changed:
adding a second model would retrain the first one's DPO, and a steering grid of one model
would re-prepare it. :data:`READS` lists, per rule, the dotted config keys its stage reads
(``{model}`` is the job's model); :func:`rule_params` cuts them out of the config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dpotox.errors import ConfigError

READS: dict[str, tuple[str, ...]] = {
    "prepare_model": (
        "models.{model}.source",
        "models.{model}.family",
        "models.{model}.dtype",
        "models.{model}.arch",
    ),
    "train_probe": ("seed", "probe", "toxicity", "evaluation.n_prompts", "neurons.lens_final_gain"),
    "make_pairs": ("seed", "dpo.pairs", "evaluation", "toxicity"),
    "train_dpo": ("seed", "dpo", "models.{model}.dpo"),
    # The pairs' scorer is the evaluations' second scorer (dpotox.scoring.second_scorer_settings).
    "evaluate": ("seed", "evaluation", "toxicity", "dpo.pairs.scorer", "dpo.pairs.same_scorer"),
    "cache_activations": ("seed", "evaluation", "activations"),
    "neuron_table": ("seed", "neurons"),
    "toxic_ablation_spec": ("neurons.decomposition",),
    "probe_checks": ("seed", "probe", "sweeps.toxic_words", "sweeps.neutral_words"),
    "neuron_stats": ("seed", "neurons"),
    "sweep_specs": (
        "seed",
        "sweeps",
        "toxicity",
        "neurons.lens_final_gain",
        # The seeded halves of the cross-fitted patches (the tables split with it too).
        "evaluation.seed",
    ),
    "sweep": ("seed", "evaluation", "toxicity", "dpo.pairs.scorer", "dpo.pairs.same_scorer"),
    "tables": ("claims",),
    "methods_tables": ("seed", "alignment"),
    "figure": ("figures",),
}
_PPL = ("ppl_window", "ppl_batch_size", "ppl_positions", "ppl_variants", "ppl_context_tokens")
# Keys inside a section read above that the rule does not use.
SKIPS: dict[str, tuple[str, ...]] = {
    # The pairs are an input file of train_dpo; how they were made is make_pairs' business.
    "train_dpo": ("dpo.pairs",),
    # How sweep conditions are spread over jobs does not change a spec.
    "sweep_specs": ("sweeps.conditions_per_job",),
    # The pairs keep the evaluation's prompts and texts out, the caches generate as it does;
    # neither depends on how perplexity and the bootstrap are computed.
    "make_pairs": tuple(
        f"evaluation.{k}"
        for k in (*_PPL, "batch_size", "stack_rows", "bootstrap_samples", "ci_level")
    ),
    "cache_activations": tuple(
        f"evaluation.{k}"
        for k in (*_PPL, "ppl_texts", "f1_texts", "stack_rows", "bootstrap_samples", "ci_level")
    ),
}


def rule_params(config: Mapping[str, Any], rule: str, model: str | None = None) -> dict[str, Any]:
    """The part of ``config`` that ``rule`` reads for ``model``: a nested dict of the keys of
    :data:`READS` (those the config has), without those of :data:`SKIPS`. A rule that reads
    ``models.{model}.*`` always gets ``models.<model>``, so the stage can name the model."""
    if rule not in READS:
        raise ConfigError(
            f"rule {rule!r} has no entry in dpotox.plan.params.READS; known: {', '.join(READS)}"
        )
    out: dict[str, Any] = {}
    for path in READS[rule]:
        keys = [k.format(model=model) for k in path.split(".")]  # a model name may hold dots
        if keys[0] == "models":
            out.setdefault("models", {}).setdefault(keys[1], {})
        node: Any = config
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                break
            node = node[k]
        else:
            target = out
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = copy.deepcopy(node)
    for path in SKIPS.get(rule, ()):
        *parents, last = path.split(".")
        target = out
        for k in parents:
            target = target.get(k, {})
        target.pop(last, None)
    return out
