"""Cluster requests per rule and model, computed from the model's size and the config.

A job's requests follow from what it holds and what it computes:

- **weights**: ``n_params`` x the bytes of the model's dtype. The parameter count is exact: the
  model is built from its architecture (``models.<m>.arch``, the size fields of its
  ``config.json``) on PyTorch's meta device, which allocates nothing.
- **inference jobs** (probe features, preference pairs, evaluation, sweeps, activation caches)
  hold the weights, one batch's key-value cache and its float32 logits. A model too large for
  one GPU is spread over several (``device_map="auto"``).
- **DPO** trains every weight under bf16 autocast with float32 master weights, float32
  gradients and one float32 RMSprop state (12 bytes per parameter) beside the frozen reference
  model in the model's dtype (freed before training when ``dpo.precompute_ref_log_probs``, which
  runs it once over the pairs instead of at every step), all sharded over the GPUs by FSDP
  when there are several
  (``config/accelerate/fsdp.yaml``), plus the checkpointed activations and a batch's logits.
- **wall time**: the job's FLOPs (2 per parameter per token forward, 6 when training) at the
  cluster's sustained rate, plus every sequential decoding step reading all weights once at
  the GPU's memory bandwidth, plus reading the weights from disk; times a safety factor.
- **host memory**: the weights once per model the job loads, plus a fixed overhead.

The cluster's numbers are the ``cluster`` section of the config (defaults: an 80 GB GPU).
Every request can be overridden: ``models.<m>.resources.<key>`` for all of a model's jobs, and
Snakemake's ``--set-resources <rule>:<key>=<value>`` (or a profile's ``set-resources``) for one
rule. A model without ``arch`` (the embedded CPU default) gets the fixed requests of
:data:`FALLBACK`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dpotox.errors import ConfigError
from dpotox.plan.config import section_settings

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MODEL_TYPES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "gemma": "gemma",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "gpt_neox": "gpt_neox",
    "phi3": "phi3",
}
# Requests of a model whose size is not given (models.<m>.arch): the embedded CPU default.
FALLBACK = {"gpu": 0, "mem_mb": 16000, "runtime": 240}
GPU_COUNTS = (1, 2, 4, 8)  # one node's worth; FSDP and device_map shard over these
TRAIN_BYTES_PER_PARAM = 12  # float32 master weights + float32 gradients + one RMSprop state
HOST_OVERHEAD_MB = 8000  # Python, torch, CUDA libraries, tokenizer, data
GPU_OVERHEAD_GB = 2.0  # CUDA context and allocator slack
# Rules that run no model on a GPU but load one (or two) on the CPU to read its weights.
CPU_RULES = ("prepare_model", "toxic_ablation_spec", "sweep_specs", "neuron_table")
# Models one job holds at once, where more than one: the source and its prepared copy, or the
# base and the DPO model. Host memory and (on a GPU) GPU memory hold each.
MODELS_HELD = {"prepare_model": 2, "neuron_table": 2, "probe_checks": 2}
GPU_RULES = (
    "train_probe",
    "make_pairs",
    "train_dpo",
    "evaluate",
    "cache_activations",
    "sweep",
    "probe_checks",
)


@dataclass(frozen=True)
class ClusterConfig:
    """The ``cluster`` section of the config (defaults and bounds: the schema)."""

    gpu_mem_gb: float = 80.0
    gpu_tflops: float = 300.0
    gpu_bandwidth_gbs: float = 2000.0
    load_gbs: float = 0.5
    safety: float = 3.0
    min_runtime: int = 30
    max_runtime: int = 2880

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClusterConfig:
        return section_settings(cls, cfg, "cluster")


@dataclass(frozen=True)
class ModelSize:
    """What the requests depend on: the parameter count and the shapes of the per-token state."""

    n_params: int
    n_layers: int
    d_model: int
    kv_width: int  # key (or value) width of one token in one layer: n_kv_heads x head_dim
    vocab: int


def size_cache() -> Path:
    """Where counted model sizes are kept: ``$DPOTOX_CACHE/model_sizes.json`` (default
    ``~/.cache/dpotox``). Every cluster job parses the Snakefile, which computes the requests of
    every model; counting costs seconds of importing transformers, reading costs nothing."""
    return (
        Path(os.environ.get("DPOTOX_CACHE") or Path.home() / ".cache" / "dpotox")
        / "model_sizes.json"
    )


def _read_sizes(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: count again and rewrite it
        return {}


def _write_sizes(path: Path, sizes: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(sizes, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:  # a read-only home only costs the next parse the count again
        pass


@lru_cache(maxsize=32)
def _size(family: str, arch_json: str) -> ModelSize:
    # The count depends on the transformers version (the classes' layouts), so it is in the key.
    key = f"{family} {arch_json} transformers=={version('transformers')}"
    path = size_cache()
    sizes = _read_sizes(path)
    if key in sizes:
        return ModelSize(**sizes[key])
    size = _count(family, arch_json)
    _write_sizes(path, {**_read_sizes(path), key: asdict(size)})
    return size


def _count(family: str, arch_json: str) -> ModelSize:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = json.loads(arch_json)
    try:
        cfg = AutoConfig.for_model(MODEL_TYPES[family], **arch)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # transformers' config validators raise several kinds
        reason = str(e).strip().splitlines()[-1]
        raise ConfigError(
            f"cannot build a {family} model from its arch {arch}: {reason}; "
            "copy the size fields of the model's config.json"
        ) from e
    text = cfg.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    d_model = getattr(text, "hidden_size", None) or text.n_embd
    head_dim = getattr(text, "head_dim", None) or d_model // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return ModelSize(
        sum(p.numel() for p in model.parameters()),
        layers,
        d_model,
        kv_heads * head_dim,
        text.vocab_size,
    )


def model_size(family: str, arch: Mapping[str, Any]) -> ModelSize:
    """The size of a ``family`` model with the ``config.json`` fields ``arch``, counted on the
    meta device (exact; nothing is allocated or downloaded) once per transformers version and
    kept in :func:`size_cache`."""
    if family not in MODEL_TYPES:
        raise ConfigError(f"unknown model family {family!r}; supported: {', '.join(MODEL_TYPES)}")
    return _size(family, json.dumps(dict(arch), sort_keys=True))


@dataclass(frozen=True)
class Work:
    """What one job of a rule computes."""

    tokens: float  # tokens through the model (prompts, decoded tokens, teacher-forced text)
    decode_steps: int  # sequential decoding steps, each reading every weight once
    rows: int  # sequences in one forward pass: the key-value cache and logits held at once
    ctx: int  # tokens per sequence
    train_tokens: float = 0.0  # tokens trained on (forward + backward: 3x the FLOPs)


def rule_work(rule: str, cfg: Mapping[str, Any]) -> Work:
    """The work of one job of ``rule`` under config ``cfg`` (schema defaults filled in). A
    sweep job evaluates ``sweeps.conditions_per_job`` conditions."""
    ev, dpo, pairs = cfg["evaluation"], cfg["dpo"], cfg["dpo"]["pairs"]
    ctx = ev["prompt_tokens"] + ev["new_tokens"]
    if rule in ("evaluate", "sweep", "cache_activations"):
        # A sweep job evaluates k conditions and decodes them stacked, up to stack_rows rows.
        k = cfg["sweeps"]["conditions_per_job"] if rule == "sweep" else 1
        rows = min(ev["stack_rows"], k * ev["batch_size"]) if rule == "sweep" else ev["batch_size"]
        texts = [ev["n_prompts"]] + ([ev["f1_texts"]] if rule != "cache_activations" else [])
        tokens = k * sum(texts) * ctx
        if rule != "cache_activations":
            tokens += k * ev["ppl_texts"] * ev["ppl_window"]
        steps = sum(math.ceil(k * n / rows) for n in texts) * ev["new_tokens"]
        return Work(tokens, steps, rows, ctx)
    if rule == "probe_checks":
        # Two models teacher-force the evaluation texts (and the base its continuations).
        return Work(3 * ev["n_prompts"] * ctx, 0, ev["batch_size"], ctx)
    if rule == "make_pairs":
        if pairs["method"] == "jsonl":
            return Work(0, 0, 1, 1)
        n, seq = (
            pairs["n_prompts"] * pairs["n_samples"],
            pairs["prompt_tokens"] + pairs["new_tokens"],
        )
        return Work(
            n * seq,
            math.ceil(n / pairs["batch_size"]) * pairs["new_tokens"],
            pairs["batch_size"],
            seq,
        )
    if rule == "train_probe":
        n = 2 * cfg["probe"]["n_per_class"]
        return Work(
            n * cfg["probe"]["max_tokens"],
            0,
            cfg["probe"]["batch_size"],
            cfg["probe"]["max_tokens"],
        )
    if rule == "train_dpo":
        # A pair is a chosen and a rejected sequence: the prompt cut to max_prompt_length and the
        # completion to max_completion_length (dpotox.stages.dpo), no longer than the sampling
        # budget
        # of generated pairs. At most one pair per prompt (best-of-n keeps the prompts whose
        # samples differ enough).
        length = dpo["max_prompt_length"] + dpo["max_completion_length"]
        if pairs["method"] != "jsonl":
            length = min(dpo["max_prompt_length"], pairs["prompt_tokens"]) + min(
                dpo["max_completion_length"], pairs["new_tokens"]
            )
        seq = 2 * length
        n_pairs = pairs["n_prompts"]
        per_step = dpo["batch_size"] * dpo["gradient_accumulation_steps"]
        steps = (
            dpo["max_steps"]
            if dpo["max_steps"] > 0
            else dpo["epochs"] * math.ceil(n_pairs * (1 - dpo["validation_fraction"]) / per_step)
        )
        trained = steps * per_step * seq
        # The reference runs once over every pair when precomputed, else beside every step.
        ref_tokens = n_pairs * seq if dpo["precompute_ref_log_probs"] else trained
        # Every validation runs policy and reference over the validation pairs.
        n_val = max(1, round(n_pairs * dpo["validation_fraction"]))
        val_tokens = math.ceil(steps / dpo["eval_steps"]) * n_val * seq * 2
        return Work(ref_tokens + val_tokens, 0, 2 * dpo["batch_size"], length, train_tokens=trained)
    raise ConfigError(f"no resource model for rule {rule!r}")


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def job_flops(n_params: int, work: Work) -> float:
    """Model FLOPs of a job: 2 per parameter per token forward, 6 per token trained on."""
    return 2 * n_params * work.tokens + 6 * n_params * work.train_tokens


@dataclass(frozen=True)
class GpuPlan:
    """How one job of a GPU rule runs on the cluster, before the safety factor."""

    gpus: int
    gb_per_gpu: float  # memory each GPU needs
    weights_gb: float
    flops: float
    seconds: float  # compute at the sustained rate + decoding at the bandwidth + loading
    trains: bool  # DPO: the host holds the trained weights beside the reference


def _weights_gb(mcfg: Mapping[str, Any]) -> float:
    """The weights of a model entry with ``arch``, in GB of its dtype."""
    return model_size(mcfg["family"], mcfg["arch"]).n_params * DTYPE_BYTES[mcfg["dtype"]] / 1e9


def _runtime(minutes: float, cc: ClusterConfig) -> int:
    """A wall-time request: rounded up to 10 minutes, within the cluster's bounds."""
    return min(max(_round_up(minutes, 10), cc.min_runtime), cc.max_runtime)


def gpu_plan(rule: str, model: str, cfg: Mapping[str, Any]) -> GpuPlan:
    """The fewest GPUs of one node that hold a job of ``rule`` for ``model`` (with ``arch``),
    and its time on them at the ``cluster`` section's rates.

    Raises:
        ConfigError: no GPU count of :data:`GPU_COUNTS` holds the job.
    """
    mcfg = cfg["models"][model]
    cc = ClusterConfig.from_config(cfg)
    size = model_size(mcfg["family"], mcfg["arch"])
    weights_gb = _weights_gb(mcfg) * MODELS_HELD.get(rule, 1)
    work = rule_work(rule, cfg)
    per_token_kv = 2 * size.n_layers * size.kv_width * DTYPE_BYTES[mcfg["dtype"]]
    logits_gb = work.rows * size.vocab * 4 * 2 / 1e9  # float32 logits and their softmax
    if work.train_tokens:
        # checkpointed: one layer input per layer, and one layer's full activations (~16x)
        acts_gb = work.rows * work.ctx * size.d_model * 2 * (size.n_layers + 16) / 1e9
        # A precomputed reference is freed before training starts; the full KL keeps a copy
        # of its output embedding (its hidden states stay in host memory).
        ref_bytes = 0 if cfg["dpo"]["precompute_ref_log_probs"] else DTYPE_BYTES[mcfg["dtype"]]
        state_gb = size.n_params * (TRAIN_BYTES_PER_PARAM + ref_bytes) / 1e9
        # Every process keeps the whole float32 copy of the reference's head (not sharded).
        head_gb = (
            size.vocab * size.d_model * 4 / 1e9
            if cfg["dpo"]["precompute_ref_log_probs"] and cfg["dpo"]["kl"] == "full"
            else 0.0
        )
        if cfg["dpo"]["kl"] == "full":
            # The full KL: float32 log-softmaxes of policy and reference at every completion
            # token, and the policy's gradient.
            rows = max(cfg["dpo"]["batch_size"], cfg["dpo"]["eval_batch_size"])
            kl_tokens = 2 * rows * cfg["dpo"]["max_completion_length"]
            acts_gb += 3 * kl_tokens * size.vocab * 4 / 1e9
        need = [
            state_gb / n + head_gb + acts_gb + 3 * logits_gb + GPU_OVERHEAD_GB for n in GPU_COUNTS
        ]
    else:
        kv_gb = work.rows * work.ctx * per_token_kv / 1e9
        need = [(weights_gb + kv_gb) / n + logits_gb + GPU_OVERHEAD_GB for n in GPU_COUNTS]
    fits = [n for n, gb in zip(GPU_COUNTS, need) if gb <= 0.9 * cc.gpu_mem_gb]
    if not fits:
        raise ConfigError(
            f"rule {rule} of model {model!r} needs {need[-1]:.0f} GB on each of "
            f"{GPU_COUNTS[-1]} GPUs of {cc.gpu_mem_gb:g} GB (cluster.gpu_mem_gb); lower the "
            "batch sizes, or set models.<model>.resources by hand"
        )
    gpus = fits[0]
    flops = job_flops(size.n_params, work)
    seconds = (
        flops / (gpus * cc.gpu_tflops * 1e12)
        + work.decode_steps * weights_gb / cc.gpu_bandwidth_gbs
        + weights_gb / cc.load_gbs
    )
    return GpuPlan(
        gpus, need[GPU_COUNTS.index(gpus)], weights_gb, flops, seconds, trains=work.train_tokens > 0
    )


def requests(rule: str, model: str, cfg: Mapping[str, Any]) -> dict[str, int]:
    """The cluster requests of one job of ``rule`` for ``model``: ``gpu``, ``gpu_mem_mb`` (per
    GPU; informational: map it to a ``constraint`` where the cluster has several GPU kinds),
    ``mem_mb`` and ``runtime`` (minutes); each key of ``models.<m>.resources`` replaces the
    computed value (``cpus_per_task`` too, which is otherwise the rule's threads)."""
    mcfg = cfg["models"][model]
    override = dict(mcfg.get("resources") or {})
    if not mcfg.get("arch"):
        return {**FALLBACK, **override}
    cc = ClusterConfig.from_config(cfg)
    on_gpu = mcfg["device"] != "cpu" and rule in GPU_RULES
    if not on_gpu:
        loads, weights_gb = MODELS_HELD.get(rule, 1), _weights_gb(mcfg)
        out = {
            "gpu": 0,
            "gpu_mem_mb": 0,
            "mem_mb": _round_up(loads * weights_gb * 1000 + HOST_OVERHEAD_MB, 1000),
            "runtime": _runtime(cc.safety * loads * weights_gb / cc.load_gbs / 60 + 10, cc),
        }
        return {**out, **override}
    plan = gpu_plan(rule, model, cfg)
    out = {
        "gpu": plan.gpus,
        "gpu_mem_mb": _round_up(plan.gb_per_gpu * 1000, 1000),
        "mem_mb": _round_up(
            plan.weights_gb * 1000 * (2 if plan.trains else 1) + HOST_OVERHEAD_MB * plan.gpus, 1000
        ),
        "runtime": _runtime(cc.safety * plan.seconds / 60 + 10, cc),
    }
    return {**out, **override}
