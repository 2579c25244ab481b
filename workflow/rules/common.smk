# Shared helpers of the rules: targets, wildcard constraints, per-model resources.

MODELS = list(config["models"])
DATASETS = ["prompts", "wiki", "probe_texts"]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(DATASETS),
    condition=r"[A-Za-z0-9][A-Za-z0-9_.+=-]*",


def model_targets(model):
    """Everything the stages built so far produce for one model (each stage adds its files)."""
    return [
        f"resources/models/{model}/base",
        *expand("resources/data/{dataset}.parquet", dataset=DATASETS),
        f"results/{model}/eval/base.json",
    ]


def model_resource(name, default=None):
    """A per-model cluster request (models.<model>.resources.<name>) for a rule's resources."""

    def get(wildcards):
        return config["models"][wildcards.model]["resources"].get(name, default)

    return get


def condition_spec(wildcards):
    """Condition "base" is the unmodified model; any other reads its spec file."""
    if wildcards.condition == "base":
        return []
    return [f"results/{wildcards.model}/specs/{wildcards.condition}.json"]
