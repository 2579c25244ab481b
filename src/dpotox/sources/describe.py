"""``dpotox inspect-model``: what dpotox would see in a model source, before a job runs.

A description is read from the model's config alone: the model is built on PyTorch's meta
device, which allocates nothing, so a 70B model is described in seconds. It gives the family,
the shapes, where the neurons live, the parameter count, the ``arch`` block for the config
and the cluster requests the workflow would make. ``check=True`` also loads the weights and
runs the adapter's checks (:mod:`dpotox.engine.verify`), as ``prepare_model`` does.
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from dpotox.engine.arch import FAMILIES, REFUSED, SUPPORTED, Adapter, family_of
from dpotox.errors import ConfigError, SourceError, UnsupportedModelError
from dpotox.sources import assets
from dpotox.sources.models import CHECK_TEXT, DTYPES, load_source, source_config, text_only

# config.json fields that fix a model's size: what `models.<m>.arch` holds (and the padding
# token, which the embedding checks against the vocabulary size when the model is built).
SIZE_FIELDS = (
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "pad_token_id",
)
KEY = "SOURCE"  # what error messages call the command's argument


def parse_source(text: str) -> dict[str, Any]:
    """A ``models.<m>.source`` entry from the command line: an existing folder (local), a
    ``PACKAGE:FILE`` pair of a pinned GGUF package, a YAML mapping as in the config
    (``{kind: hub, id: ..., revision: ...}``), or a hub id with an optional ``@revision``."""
    if text.lstrip().startswith("{"):
        src = yaml.safe_load(text)
        if not isinstance(src, dict) or "kind" not in src:
            raise SourceError(f"{KEY}: {text!r} is not a source mapping with a kind")
        return src
    if Path(text).exists() or text.startswith(("/", ".", "~")):  # hub ids are org/name
        return {"kind": "local", "path": str(Path(text).expanduser())}
    package, _, file = text.partition(":")
    if file and (package, file) in assets.GGUF_FILES:
        return {"kind": "gguf-package", "package": package, "file": file}
    if file or Path(text).suffix == ".gguf":
        known = ", ".join(f"{p}:{f}" for p, f in assets.GGUF_FILES)
        raise SourceError(f"{KEY}: {text!r} is no pinned GGUF package file; known: {known}")
    ident, _, revision = text.partition("@")
    return {"kind": "hub", "id": ident, "revision": revision or "main"}


def _closest(model_type: str, model: torch.nn.Module | None) -> list[str]:
    """Families whose name is near ``model_type`` or whose module paths resolve on ``model``."""
    names = {t: f.name for f in FAMILIES.values() for t in f.model_types}
    near = [names[t] for t in difflib.get_close_matches(model_type, names, n=3, cutoff=0.6)]
    shaped = []
    if model is not None:
        for fam in FAMILIES.values():
            try:
                layer = model.get_submodule(fam.layers + ".0")
                mlp = layer.get_submodule(fam.mlp)
                mlp.get_submodule(fam.out_proj)
                mlp.get_submodule(fam.key_proj)
            except AttributeError:
                continue
            shaped.append(fam.name)
    return list(dict.fromkeys(near + shaped))


def _arch(config: Any) -> dict[str, Any]:
    text = config.get_text_config()
    values = text.to_dict()
    return {k: values[k] for k in SIZE_FIELDS if values.get(k) is not None}


def _requests(family: str, arch: Mapping[str, Any], src: Mapping[str, Any], dtype: str):
    """What the workflow would ask a SLURM cluster for, per rule, under the default config."""
    from dpotox.plan.config import validate_config
    from dpotox.plan.resources import CPU_RULES, GPU_RULES, requests

    entry = {"source": dict(src), "family": family, "arch": dict(arch), "dtype": dtype}
    # Only the defaults are wanted: the default sweeps' neuron counts need not fit a tiny model.
    cfg = validate_config({"models": {"m": entry}}, check_paths=False, check_relations=False)
    return {rule: requests(rule, "m", cfg) for rule in (*CPU_RULES, *GPU_RULES)}


def describe(
    src: Mapping[str, Any], *, dtype: str = "float32", check: bool = False
) -> dict[str, Any]:
    """Describe the model of source ``src`` (a ``models.<m>.source`` entry).

    Returns:
        ``supported`` (bool) and, for a supported model, ``family``, ``model_type``, the
        shapes, ``gated``, ``post_mlp_norm``, ``paths``, ``n_parameters``, ``arch``,
        ``requests`` (per rule) and, with ``check``, ``adapter_checks``; for another model,
        ``reason``, ``supported_families`` and ``closest``.

    Raises:
        SourceError: the source cannot be read (offline and not cached, not a model folder).
        AdapterCheckError: with ``check``, the adapter misreads the model.
    """
    with tempfile.TemporaryDirectory(prefix="dpotox-inspect.") as tmp:
        config = source_config(src, KEY, Path(tmp))
        model_type = config.model_type
        try:
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(config)
        except Exception as e:  # an architecture this transformers does not know
            meta, built = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            built = None
        out: dict[str, Any] = {"source": dict(src), "model_type": model_type}
        try:
            fam = family_of(model_type)
            if meta is None:
                raise UnsupportedModelError(f"transformers cannot build it: {built}")
        except UnsupportedModelError as e:
            reason = REFUSED.get(model_type) or (
                f"dpotox has no family for model type {model_type!r}"
                if meta is not None
                else str(e)
            )
            return {
                **out,
                "supported": False,
                "reason": reason,
                "supported_families": list(SUPPORTED),
                "closest": _closest(model_type, meta),
            }
        text = text_only(meta)
        adapter = Adapter(text, fam.name)
        arch = _arch(config)
        out.update(
            supported=True,
            family=fam.name,
            multimodal=text is not meta,
            n_layers=adapter.n_layers,
            d_model=adapter.d_model,
            d_mlp=adapter.d_mlp,
            n_neurons=adapter.n_layers * adapter.d_mlp,
            gated=fam.up_proj is not None or fam.fused_gate_up,
            post_mlp_norm=fam.post_mlp_norm,
            paths=adapter.paths(),
            n_parameters=sum(p.numel() for p in text.parameters()),
            arch=arch,
        )
        try:
            out["requests"] = _requests(fam.name, arch, src, dtype)
        except ConfigError as e:
            out["requests_error"] = str(e)
        if check:
            from dpotox.engine.verify import verify_adapter

            model, tok = load_source(src, KEY, DTYPES[dtype], Path(tmp))
            ids = tok(CHECK_TEXT, return_tensors="pt")["input_ids"]
            out["adapter_checks"] = verify_adapter(Adapter(model, fam.name), ids)
    return out


def format_description(d: Mapping[str, Any]) -> str:
    """The description as the text ``dpotox inspect-model`` prints."""
    src = ", ".join(f"{k}: {v}" for k, v in d["source"].items())
    lines = [f"source        {{{src}}}", f"model_type    {d['model_type']}"]
    if not d["supported"]:
        lines += [
            f"not supported {d['reason']}",
            f"families      {', '.join(d['supported_families'])}",
            "closest       "
            + (", ".join(d["closest"]) if d["closest"] else "none by name or module layout"),
        ]
        return "\n".join(lines)
    norm = d["post_mlp_norm"]
    lines += [
        f"family        {d['family']}"
        + ("  (multimodal checkpoint: its text tower is used)" if d["multimodal"] else ""),
        f"layers        {d['n_layers']}",
        f"d_model       {d['d_model']}",
        f"d_mlp         {d['d_mlp']}  ({d['n_neurons']:,} neurons)",
        f"gated MLP     {'yes' if d['gated'] else 'no'}",
        "post-MLP norm "
        + (
            f"yes ({norm}): value vectors describe the MLP output before the norm"
            if norm
            else "no: the MLP output is added to the residual stream as it is"
        ),
        f"parameters    {d['n_parameters']:,}",
        "where the neurons live ({l} = a layer):",
    ]
    lines += [f"  {k:22s} {v}" for k, v in d["paths"].items()]
    lines.append("arch (for models.<m>.arch; the cluster requests are computed from it):")
    lines.append("  " + yaml.safe_dump(d["arch"], default_flow_style=True, width=1000).strip())
    if "requests" in d:
        lines.append("cluster requests per job (default config; models.<m>.resources overrides):")
        for rule, r in d["requests"].items():
            lines.append(
                f"  {rule:20s} gpu={r['gpu']} gpu_mem_mb={r['gpu_mem_mb']} "
                f"mem_mb={r['mem_mb']} runtime={r['runtime']} min"
            )
    else:
        lines.append(f"cluster requests: {d['requests_error']}")
    if "adapter_checks" in d:
        checks = ", ".join(f"{k} {v:.2g}" for k, v in d["adapter_checks"].items())
        lines.append(f"adapter checks passed (largest relative error): {checks}")
    return "\n".join(lines)
