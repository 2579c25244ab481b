"""Activation caching: every neuron's MLP activation ``m`` over greedy generation, as Parquet.

The activations are those that produce a model's own greedy continuation of each evaluation
prompt: at the last prompt position and at each generated position that produces a kept
token (a row that has emitted end-of-sequence stops counting). They are read on every layer's
output projection by the hook engine (:class:`dpotox.engine.hooks.Recorder`), after any
intervention's edits, during the same batched generation that ``evaluate`` runs (same
prompts, batches and greedy tokens).

Layout of one cache (``results/{model}/activations/{variant}/``), plain Parquet, partitioned
by layer so that a reader can take one layer without touching the others::

    _meta.json                    what was cached, how; written last (the cache is complete)
    layer=00/part-0.parquet       one row per (prompt, neuron), one row group per batch
    layer=01/part-0.parquet       ...

Columns: ``prompt_id`` (string: the prompt's id in ``resources/data/prompts.parquet``),
``neuron`` (int32, 0-based index in the layer), ``activation`` (float32: the mean of ``m``
over the prompt's positions, summed in float64), ``n_positions`` (int32: how many positions the
mean is over). ``layer`` is the partition key. Families with a post-MLP norm (Gemma-2/3,
OLMo-2) add ``written`` (float32): the mean of ``m * s``, ``s`` the norm's per-token scale, the
activation in units of :meth:`~dpotox.engine.arch.Adapter.written_vectors` (what the layer adds
to the residual stream; docs/neurons.md); for the other families ``written`` would equal
``activation`` and is not stored. With ``activations.per_position`` a second
cache of the same layout (``results/{model}/activations_positions/{variant}/``) holds one row
per (prompt, position, neuron) with ``position`` (int32: 0 is the last prompt position, k the
k-th generated token) instead of ``n_positions``.

A cache is written into a staging folder in ``.partial/`` beside its target
(:func:`dpotox.io.atomic_dir`) and renamed into place only when complete, so an interrupted
run leaves nothing a later rule, or the caches' glob, takes as a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import Generation, encode_prompts, generate, inference_device
from dpotox.engine.hooks import Context
from dpotox.engine.spec import Intervention
from dpotox.errors import DpotoxError
from dpotox.io import atomic_dir, write_json
from dpotox.plan.config import section_settings

log = logging.getLogger("dpotox")

META = "_meta.json"
MEAN_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("neuron", pa.int32()),
        ("activation", pa.float32()),
        ("n_positions", pa.int32()),
    ]
)
POSITION_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("position", pa.int32()),
        ("neuron", pa.int32()),
        ("activation", pa.float32()),
    ]
)
WRITTEN = pa.field("written", pa.float32())


class ActivationsError(DpotoxError, ValueError):
    """A cache that is missing, incomplete or does not fit the model; the message says which."""


@dataclass
class ActivationsConfig:
    """The ``activations`` section of the config (defaults: the schema)."""

    per_position: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ActivationsConfig:
        return section_settings(cls, cfg, "activations")


def layer_dir(root: str | Path, layer: int) -> Path:
    """The partition folder of one layer (two digits, so folders sort by layer)."""
    return Path(root) / f"layer={layer:02d}"


class _LayerWriters:
    """One streaming Parquet writer per layer; each ``write`` adds a row group."""

    def __init__(self, root: Path, schema: pa.Schema, n_layers: int) -> None:
        self.root, self.schema, self.n_layers = root, schema, n_layers
        self.writers: dict[int, pq.ParquetWriter] = {}

    def write(self, layer: int, columns: dict[str, pa.Array]) -> None:
        if layer not in self.writers:
            path = layer_dir(self.root, layer) / "part-0.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Dictionary pages for the repetitive columns only: trying them on the float
            # activations (and their statistics) doubled the write time for nothing.
            keys = [f.name for f in self.schema if f.type != pa.float32()]
            self.writers[layer] = pq.ParquetWriter(
                path, self.schema, use_dictionary=keys, write_statistics=keys
            )
        self.writers[layer].write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class ParquetRecorder:
    """A :class:`~dpotox.engine.hooks.Recorder` that streams activations to layer partitions.

    Per batch it keeps one float64 sum per (prompt, layer, neuron) on the model's device and
    writes the batch's means when the batch finishes, so memory depends on the batch size,
    never on the number of prompts. With ``positions_root`` every position is also written,
    as it is produced.
    """

    def __init__(
        self,
        root: Path,
        n_layers: int,
        d_mlp: int,
        device: torch.device,
        positions_root: Path | None = None,
        *,
        written: bool = False,
    ) -> None:
        self.n_layers, self.d_mlp, self.device = n_layers, d_mlp, device
        # Post-MLP-norm families: a second sum, of m times the norm's per-token scale.
        self.written = written
        mean_schema = MEAN_SCHEMA.append(WRITTEN) if written else MEAN_SCHEMA
        pos_schema = POSITION_SCHEMA.append(WRITTEN) if written else POSITION_SCHEMA
        self.means = _LayerWriters(root, mean_schema, n_layers)
        self.positions = (
            _LayerWriters(positions_root, pos_schema, n_layers)
            if positions_root is not None
            else None
        )
        self.n_prompts = 0
        self.n_positions = 0
        self._neurons = pa.array(np.arange(d_mlp, dtype=np.int32))

    def start(self, ctx: Context) -> None:
        b = len(ctx.prompt_ids)
        self.ids = pa.array(list(ctx.prompt_ids), pa.string())
        # Layer-major, so each layer's running sum is one contiguous block.
        self.sums = torch.zeros(
            self.n_layers, b, self.d_mlp, dtype=torch.float64, device=self.device
        )
        self.written_sums = torch.zeros_like(self.sums) if self.written else None
        self.counts = torch.zeros(b, dtype=torch.long, device=self.device)
        self.next_position = 0

    def record(
        self, layer: int, m: torch.Tensor, ctx: Context, scale: torch.Tensor | None = None
    ) -> None:
        if self.written and scale is None:
            raise ActivationsError(
                "this cache records written activations, but the hook gave no post-MLP norm "
                "scale: the model's family has no post-MLP norm"
            )
        if layer == 0:
            # Once per forward pass: which rows count, as a float64 column to weight by.
            active = (
                ctx.active
                if ctx.active is not None
                else torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
            )
            self.active = active
            self.weight = active.to(torch.float64)[:, None]
            self.position = self.next_position
            self.next_position += m.shape[1]
            self.counts += active.long() * m.shape[1]
        m64 = m.to(torch.float64)
        self.sums[layer].addcmul_(m64.sum(1), self.weight)
        if self.written:
            w64 = m64 * scale.to(torch.float64)
            self.written_sums[layer].addcmul_(w64.sum(1), self.weight)
        if self.positions is not None:
            active = self.active
            rows = active.nonzero()[:, 0]
            vals = m[rows].float().cpu().numpy()  # [rows, positions, d_mlp]
            n_rows, n_pos, d = vals.shape
            columns = {
                "prompt_id": pc.take(self.ids, pa.array(np.repeat(rows.cpu().numpy(), n_pos * d))),
                "position": pa.array(
                    np.tile(
                        np.repeat(
                            np.arange(self.position, self.position + n_pos, dtype=np.int32), d
                        ),
                        n_rows,
                    )
                ),
                "neuron": pa.array(np.tile(np.arange(d, dtype=np.int32), n_rows * n_pos)),
                "activation": pa.array(vals.reshape(-1)),
            }
            if self.written:
                columns["written"] = pa.array((w64[rows].float().cpu().numpy()).reshape(-1))
            self.positions.write(layer, columns)

    def finish(self, ctx: Context) -> None:
        b = len(self.ids)
        if bool((self.counts == 0).any()):
            raise ActivationsError(
                "a prompt produced no position to average over; this is a "
                "bug in the generation loop, not in the data"
            )
        means = (self.sums / self.counts[:, None]).float().cpu().numpy()  # [L, b, d]
        written = (
            (self.written_sums / self.counts[:, None]).float().cpu().numpy()
            if self.written
            else None
        )
        rows = pa.array(np.repeat(np.arange(b), self.d_mlp))
        ids = pc.take(self.ids, rows)
        counts = pa.array(np.repeat(self.counts.cpu().numpy().astype(np.int32), self.d_mlp))
        neurons = pa.concat_arrays([self._neurons] * b)
        for layer in range(self.n_layers):
            columns = {
                "prompt_id": ids,
                "neuron": neurons,
                "activation": pa.array(means[layer].reshape(-1)),
                "n_positions": counts,
            }
            if written is not None:
                columns["written"] = pa.array(written[layer].reshape(-1))
            self.means.write(layer, columns)
        self.n_prompts += b
        self.n_positions += int(self.counts.sum())

    def close(self) -> None:
        self.means.close()
        if self.positions is not None:
            self.positions.close()


def cache_generation(
    adapter: Adapter,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    out_dir: str | Path,
    *,
    spec: Intervention | None = None,
    new_tokens: int = 20,
    batch_size: int = 32,
    positions_dir: str | Path | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Generation, dict[str, Any]]:
    """Generate greedily from tokenised ``prompts`` under ``spec`` and cache the activations.

    Writes ``out_dir`` (and ``positions_dir`` if given) complete or not at all; ``meta`` is
    added to ``_meta.json``. Returns the generation and the metadata written.
    """
    out_dir = Path(out_dir)
    if len(set(ids)) != len(ids):
        raise ActivationsError("prompt ids must be unique: the cache identifies rows by them")
    device = next(adapter.model.parameters()).device
    with contextlib.ExitStack() as stack:
        # Entered in this order, the positions folder is published before the means folder.
        staging = stack.enter_context(atomic_dir(out_dir))
        pos_staging = (
            stack.enter_context(atomic_dir(positions_dir)) if positions_dir is not None else None
        )
        written = adapter.post_mlp_norm(0) is not None
        recorder = ParquetRecorder(
            staging, adapter.n_layers, adapter.d_mlp, device, pos_staging, written=written
        )
        # Closed before the folders are published, or removed on error.
        stack.callback(recorder.close)
        gen = generate(
            adapter,
            tok,
            prompts,
            ids,
            spec=spec,
            new_tokens=new_tokens,
            batch_size=batch_size,
            recorder=recorder,
        )
        recorder.close()
        info = {
            **(meta or {}),
            "spec": spec.name if spec is not None else None,
            "n_prompts": recorder.n_prompts,
            "n_positions": recorder.n_positions,
            "n_layers": adapter.n_layers,
            "d_mlp": adapter.d_mlp,
            "new_tokens": new_tokens,
            "batch_size": batch_size,
            "generated_tokens": gen.n_new_tokens,
            "generation_seconds": gen.seconds,
            "per_position": positions_dir is not None,
            "written": written,
            "dtype": str(next(adapter.model.parameters()).dtype).removeprefix("torch."),
            "columns": {
                "prompt_id": "prompt id (resources/data/prompts.parquet)",
                "neuron": "neuron index in the layer",
                "activation": "mean MLP activation m over the prompt's positions",
                "n_positions": "positions averaged (last prompt position + generated)",
                "layer": "partition key (folder layer=NN)",
                **(
                    {
                        "written": "mean of m times the post-MLP norm's per-token scale: the "
                        "activation in units of the gain-scaled value vectors"
                    }
                    if written
                    else {}
                ),
            },
        }
        for root in (staging, pos_staging):
            if root is not None:
                write_json(info, root / META)
    return gen, info


# -- reading -----------------------------------------------------------------------------------


def read_meta(root: str | Path) -> dict[str, Any]:
    """The ``_meta.json`` of a complete cache, or a clear error if ``root`` is not one."""
    root = Path(root)
    if not root.is_dir():
        raise ActivationsError(
            f"activation cache {root} does not exist; run rule "
            "cache_activations (or dpotox.stages.activations.cache_activations)"
        )
    if not (root / META).is_file():
        raise ActivationsError(
            f"activation cache {root} is incomplete (no {META}); delete it "
            "and run rule cache_activations again"
        )
    meta = json.loads((root / META).read_text())
    missing = [
        layer
        for layer in range(meta["n_layers"])
        if not (layer_dir(root, layer) / "part-0.parquet").is_file()
    ]
    if missing:
        raise ActivationsError(
            f"activation cache {root} lacks layer {missing[0]} "
            f"({len(missing)} layers missing); run rule cache_activations again"
        )
    return meta


def prompt_means(
    root: str | Path, layer: int, *, written: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(prompt ids, means [n_prompts, d_mlp] float64, n_positions [n_prompts])`` of a layer.

    ``written``: the means of ``m`` times the post-MLP norm's scale (:func:`mean_activations`).
    """
    meta = read_meta(root)
    if not 0 <= layer < meta["n_layers"]:
        raise ActivationsError(
            f"layer {layer} is out of range; {root} holds layers 0..{meta['n_layers'] - 1}"
        )
    return _layer_means(root, meta, layer, _column(meta, written))


def _column(meta: Mapping[str, Any], written: bool) -> str:
    # A family without a post-MLP norm writes sum_i m_i v_i: its written activation is m.
    return "written" if written and meta.get("written", False) else "activation"


def _layer_means(
    root: str | Path, meta: Mapping[str, Any], layer: int, column: str = "activation"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    t = pq.read_table(layer_dir(root, layer) / "part-0.parquet")
    n, d = meta["n_prompts"], meta["d_mlp"]
    if t.num_rows != n * d:
        raise ActivationsError(
            f"{layer_dir(root, layer)} has {t.num_rows} rows, expected "
            f"{n} prompts x {d} neurons; run rule cache_activations again"
        )
    # Rows are written prompt by prompt, neuron by neuron: a reshape recovers the matrix.
    ids = t.column("prompt_id").take(pa.array(np.arange(0, n * d, d))).to_pylist()
    acts = t.column(column).to_numpy().astype(np.float64).reshape(n, d)
    counts = t.column("n_positions").to_numpy()[::d].astype(np.int64)
    return ids, acts, counts


def mean_activations(
    root: str | Path, *, written: bool = False, prompts: Collection[str] | None = None
) -> np.ndarray:
    """``[n_layers, d_mlp]`` float64: each neuron's activation averaged over every cached
    position of every prompt (per-prompt means weighted by their position counts).

    ``written``: average ``m * s`` instead, ``s`` the post-MLP norm's per-token scale, so that
    the means times :meth:`~dpotox.engine.arch.Adapter.written_vectors` sum to the layer's mean
    residual increment; the same as ``m`` for families without that norm.
    ``prompts``: average over these prompts' positions only (cross-fitting: the means of one
    half of the evaluation prompts); every id must be in the cache.
    """
    meta = read_meta(root)
    column = _column(meta, written)
    out = np.empty((meta["n_layers"], meta["d_mlp"]))
    for layer in range(meta["n_layers"]):
        # The cache was checked once above; each layer is only read.
        ids, acts, counts = _layer_means(root, meta, layer, column)
        if prompts is not None:
            keep = np.isin(np.asarray(ids, dtype=object), list(prompts))
            missing = set(prompts) - set(ids)
            if missing or not keep.any():
                raise ActivationsError(
                    f"{root} holds no positions of prompts {sorted(missing)[:3]}: the cache "
                    "is of other evaluation prompts; rerun rule cache_activations"
                )
            acts, counts = acts[keep], counts[keep]
        out[layer] = counts @ acts / counts.sum()
    return out


# -- the rule ----------------------------------------------------------------------------------


def cache_activations(
    *,
    model_dir: str | Path,
    prompts_path: str | Path,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    positions_dir: str | Path | None = None,
    spec_path: str | Path | None = None,
    variant: str = "base",
    device: str = "cpu",
) -> dict[str, Any]:
    """Rule ``cache_activations``: the evaluation prompts' activations of one model variant.

    The prompts, prompt length, continuation length and batch size are the ``evaluation``
    section's, so the cached positions are those of the evaluated continuations. Returns the
    metadata written to ``_meta.json``.
    """
    from dpotox.sources.models import load_prepared
    from dpotox.stages.evaluate import EvalConfig, evaluation_prompts

    ec = EvalConfig.from_config(cfg)
    ac = ActivationsConfig.from_config(cfg)
    if ac.per_position and positions_dir is None:
        raise ActivationsError(
            "activations.per_position is set but no folder was given for the per-position cache"
        )
    device = inference_device(device)
    t0 = time.perf_counter()
    spec = Intervention.load(spec_path) if spec_path else None
    prompts = evaluation_prompts(pd.read_parquet(prompts_path), ec.n_prompts)
    ids = prompts["id"].astype(str).tolist()
    model, tok = load_prepared(model_dir, device=device)
    adapter = Adapter(model)
    tokens = encode_prompts(tok, prompts["text"].tolist(), ids, max_tokens=ec.prompt_tokens)
    log.info(
        "caching %s: %d prompts, %d layers x %d neurons, spec %s",
        variant,
        len(ids),
        adapter.n_layers,
        adapter.d_mlp,
        spec_path or "none",
    )
    gen, info = cache_generation(
        adapter,
        tok,
        tokens,
        ids,
        out_dir,
        spec=spec,
        new_tokens=ec.new_tokens,
        batch_size=ec.batch_size,
        positions_dir=positions_dir if ac.per_position else None,
        meta={
            "variant": variant,
            "model_dir": str(model_dir),
            "prompts": str(prompts_path),
            "prompt_tokens": ec.prompt_tokens,
            "settings": asdict(ac),
        },
    )
    log.info(
        "cached %d prompts x %d positions in %.1f s (generation %.1f s, %d tokens)",
        info["n_prompts"],
        info["n_positions"],
        time.perf_counter() - t0,
        gen.seconds,
        gen.n_new_tokens,
    )
    return info
