"""Interventions as data: what a condition changes in a model, and its file format.

Every condition of the papers' tables is an :class:`Intervention`: a named list of edits.

- :class:`SetNeurons`: set chosen neurons' activations ``m`` to given values: patching (one
  value per neuron, or one row per prompt for per-prompt patching) and ablation (value 0).
- :class:`ScaleNeurons`: multiply chosen neurons' live activations by per-neuron factors
  (activation editing).
- :class:`AddResidual`: add ``alpha * vector`` to the residual stream after a layer
  (steering; a negative ``alpha`` subtracts).
- :class:`ScaleKeys`: multiply chosen neurons' key vectors (what they read) by factors; a weight
  edit made on a copy of the weight, so the model's own tensor is never written.

Neuron edits act on the input of the MLP's output projection (``dpotox.engine.arch``), so they
work the same for every family. Each activation edit says where it acts: ``"all"`` (every
position) or ``"generation"`` (the last prompt position and every generated position: the
papers' setting). The one engine that applies a spec is :mod:`dpotox.engine.hooks`.

On disk a spec is JSON. Arrays with more than ``inline_limit`` numbers (per-prompt patching of
many neurons) go into a sidecar ``<spec>.safetensors`` that the JSON names by key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

from dpotox.engine.arch import Adapter
from dpotox.errors import DpotoxError
from dpotox.io import atomic_path, write_json

Where = Literal["all", "generation"]
WHERE = ("all", "generation")


class InterventionError(DpotoxError, ValueError):
    """A spec that cannot apply to this model or these prompts; the message names the edit."""


def _tensor(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (
        x.detach().to(dtype).cpu() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
    )


@dataclass
class SetNeurons:
    """Set neurons of one layer to ``values``: a scalar, ``[n]``, or ``[n_prompts, n]``.

    With ``prompt_ids`` (per-prompt patching) row ``j`` of ``values`` is used for the prompt
    whose id is ``prompt_ids[j]``.
    """

    layer: int
    neurons: torch.Tensor
    values: torch.Tensor
    prompt_ids: tuple[str, ...] | None = None
    where: Where = "generation"
    op: ClassVar[str] = "set"
    arrays: ClassVar[tuple[str, ...]] = ("neurons", "values")

    def __post_init__(self) -> None:
        self.neurons = _tensor(self.neurons, torch.long).reshape(-1)
        self.values = _tensor(self.values)
        if self.prompt_ids is not None:
            self.prompt_ids = tuple(map(str, self.prompt_ids))


@dataclass
class ScaleNeurons:
    """Multiply neurons' live activations by ``factors`` (a scalar or ``[n]``)."""

    layer: int
    neurons: torch.Tensor
    factors: torch.Tensor
    where: Where = "generation"
    op: ClassVar[str] = "scale"
    arrays: ClassVar[tuple[str, ...]] = ("neurons", "factors")

    def __post_init__(self) -> None:
        self.neurons = _tensor(self.neurons, torch.long).reshape(-1)
        self.factors = _tensor(self.factors)


@dataclass
class AddResidual:
    """Add ``alpha * vector`` (``[d_model]``) to the residual stream after decoder layer
    ``layer``."""

    layer: int
    vector: torch.Tensor
    alpha: float = 1.0
    where: Where = "all"
    op: ClassVar[str] = "add"
    arrays: ClassVar[tuple[str, ...]] = ("vector",)

    def __post_init__(self) -> None:
        self.vector = _tensor(self.vector)
        self.alpha = float(self.alpha)


@dataclass
class ScaleKeys:
    """Multiply the key vectors (GPT-2 ``c_fc``, GLU gate rows) of neurons by ``factors``.

    A weight edit: it acts at every position for as long as the spec is applied.
    """

    layer: int
    neurons: torch.Tensor
    factors: torch.Tensor
    op: ClassVar[str] = "scale_keys"
    arrays: ClassVar[tuple[str, ...]] = ("neurons", "factors")

    def __post_init__(self) -> None:
        self.neurons = _tensor(self.neurons, torch.long).reshape(-1)
        self.factors = _tensor(self.factors)


Edit = SetNeurons | ScaleNeurons | AddResidual | ScaleKeys
EDIT_TYPES: dict[str, type] = {t.op: t for t in (SetNeurons, ScaleNeurons, AddResidual, ScaleKeys)}


def ablate(layer: int, neurons: Sequence[int], where: Where = "generation") -> SetNeurons:
    """Zero the activations of ``neurons`` in ``layer``."""
    return SetNeurons(layer, torch.as_tensor(list(neurons)), torch.tensor(0.0), where=where)


@dataclass
class Intervention:
    """A named condition: edits applied together, in list order where they touch one layer."""

    name: str
    edits: list[Edit] = field(default_factory=list)
    description: str = ""
    # Numbers about the spec for the tables (e.g. an edit's projected reduction along the
    # probe); written to the JSON only when there are any.
    meta: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Intervention) -> Intervention:
        return Intervention(
            f"{self.name}+{other.name}",
            [*self.edits, *other.edits],
            " + ".join(d for d in (self.description, other.description) if d),
        )

    @property
    def per_prompt(self) -> bool:
        return any(isinstance(e, SetNeurons) and e.prompt_ids is not None for e in self.edits)

    @property
    def n_neurons(self) -> int:
        """How many (layer, neuron) pairs the neuron and key edits touch (0 for steering)."""
        return int(sum(e.neurons.numel() for e in self.edits if hasattr(e, "neurons")))

    @property
    def shares_prefix(self) -> bool:
        """True if the spec leaves a prompt's tokens before the last one untouched (every edit
        acts at the generation positions only): conditions that do can share one prefill of
        the prompts' prefix (``dpotox.engine.generate``). Weight edits act everywhere."""
        return all(not isinstance(e, ScaleKeys) and e.where == "generation" for e in self.edits)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(
        self, *, inline_limit: int | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """A JSON-ready dict; arrays over ``inline_limit`` numbers go to ``tensors`` by key."""
        edits = []
        for i, e in enumerate(self.edits):
            d: dict[str, Any] = {"op": e.op}
            for name, value in vars(e).items():
                if name in e.arrays:
                    if (
                        inline_limit is not None
                        and tensors is not None
                        and value.numel() > inline_limit
                    ):
                        key = f"edits.{i}.{name}"
                        tensors[key] = value.contiguous()
                        d[name] = {"tensor": key, "shape": list(value.shape)}
                    else:
                        d[name] = value.tolist()
                elif value is not None:
                    d[name] = list(value) if isinstance(value, tuple) else value
            edits.append(d)
        out: dict[str, Any] = {"name": self.name, "description": self.description, "edits": edits}
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        where: str = "spec",
    ) -> Intervention:
        """Build a spec from :meth:`to_dict` output; a malformed entry names its place."""
        if (
            not isinstance(data, dict)
            or "name" not in data
            or not isinstance(data.get("edits"), list)
        ):
            raise InterventionError(f"{where}: a spec is an object with 'name' and a list 'edits'")
        edits: list[Edit] = []
        for i, d in enumerate(data["edits"]):
            loc = f"{where}: edit {i}"
            if not isinstance(d, dict) or d.get("op") not in EDIT_TYPES:
                raise InterventionError(
                    f"{loc}: 'op' must be one of {', '.join(EDIT_TYPES)}, "
                    f"got {d.get('op') if isinstance(d, dict) else d!r}"
                )
            kind = EDIT_TYPES[d["op"]]
            kwargs = {k: v for k, v in d.items() if k != "op"}
            for name, value in kwargs.items():
                if isinstance(value, dict) and "tensor" in value:
                    if tensors is None or value["tensor"] not in tensors:
                        raise InterventionError(
                            f"{loc}: array {name!r} refers to tensor "
                            f"{value['tensor']!r}, which the sidecar file lacks"
                        )
                    kwargs[name] = tensors[value["tensor"]]
            if kwargs.get("where", "all") not in WHERE:
                raise InterventionError(
                    f"{loc}: where must be one of {', '.join(WHERE)}, got {kwargs['where']!r}"
                )
            try:
                edits.append(kind(**kwargs))
            except (TypeError, ValueError, RuntimeError) as e:
                raise InterventionError(f"{loc} ({d['op']}): {e}") from None
        meta = data.get("meta", {})
        if not isinstance(meta, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in meta.values()
        ):
            raise InterventionError(f"{where}: 'meta' must be an object of numbers")
        return cls(str(data["name"]), edits, str(data.get("description", "")), dict(meta))

    def save(self, path: str | Path, *, inline_limit: int = 4096) -> Path:
        """Write the spec as JSON (and a ``.safetensors`` sidecar for large arrays), atomically."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        data = self.to_dict(inline_limit=inline_limit, tensors=tensors)
        sidecar = sidecar_path(path)
        if tensors:
            data["tensors"] = sidecar.name
            with atomic_path(sidecar) as tmp:
                save_file(tensors, str(tmp))
        write_json(data, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Intervention:
        """Read a spec written by :meth:`save` (or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise InterventionError(f"spec file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InterventionError(f"spec file {path} is not valid JSON: {e}") from None
        tensors = None
        if isinstance(data, dict) and data.get("tensors"):
            sidecar = path.parent / data["tensors"]
            if not sidecar.is_file():
                raise InterventionError(
                    f"spec file {path} names the sidecar {sidecar}, which "
                    "does not exist; write specs with Intervention.save"
                )
            tensors = load_file(str(sidecar))
        return cls.from_dict(data, tensors=tensors, where=f"spec file {path}")


def sidecar_path(spec_path: str | Path) -> Path:
    """Where :meth:`Intervention.save` puts a spec's large arrays."""
    return Path(spec_path).with_suffix(".safetensors")


# -- checking ---------------------------------------------------------------------------


def check(spec: Intervention, adapter: Adapter, *, prompt_ids: Sequence[str] | None = None) -> None:
    """Raise :class:`InterventionError` naming the first edit that cannot apply.

    Checks layers and neurons against the model, array shapes, finiteness, and (with
    ``prompt_ids``) that per-prompt edits hold a row for every prompt.
    """
    n_layers, d_mlp, d_model = adapter.n_layers, adapter.d_mlp, adapter.d_model
    for i, e in enumerate(spec.edits):
        loc = f"intervention {spec.name!r} edit {i} ({e.op}, layer {e.layer})"
        if not 0 <= e.layer < n_layers:
            raise InterventionError(
                f"{loc}: layer {e.layer} is out of range; the model has "
                f"{n_layers} layers (0..{n_layers - 1})"
            )
        if isinstance(e, AddResidual):
            if e.vector.shape != (d_model,):
                raise InterventionError(
                    f"{loc}: the vector has shape {tuple(e.vector.shape)}, "
                    f"expected ({d_model},) (the model's d_model)"
                )
            arrays = [e.vector]
        else:
            n = e.neurons.numel()
            if n == 0:
                raise InterventionError(f"{loc}: no neurons given")
            bad = e.neurons[(e.neurons < 0) | (e.neurons >= d_mlp)]
            if bad.numel():
                raise InterventionError(
                    f"{loc}: neuron {int(bad[0])} is out of range; layer "
                    f"{e.layer} has {d_mlp} neurons (0..{d_mlp - 1})"
                )
            if torch.unique(e.neurons).numel() != n:
                raise InterventionError(f"{loc}: a neuron is listed twice")
            arr = e.values if isinstance(e, SetNeurons) else e.factors
            arrays = [arr]
            if isinstance(e, SetNeurons) and e.prompt_ids is not None:
                if arr.shape != (len(e.prompt_ids), n):
                    raise InterventionError(
                        f"{loc}: per-prompt values have shape "
                        f"{tuple(arr.shape)}, expected ({len(e.prompt_ids)}, {n})"
                    )
                if len(set(e.prompt_ids)) != len(e.prompt_ids):
                    raise InterventionError(f"{loc}: a prompt id is listed twice")
                if prompt_ids is not None:
                    have = set(e.prompt_ids)
                    missing = [p for p in prompt_ids if p not in have]
                    if missing:
                        raise InterventionError(
                            f"{loc}: no per-prompt values for prompt "
                            f"{missing[0]!r} ({len(missing)} prompts missing)"
                        )
            elif arr.dim() > 1 or (arr.dim() == 1 and arr.shape[0] != n):
                raise InterventionError(
                    f"{loc}: {len(e.neurons)} neurons but values of shape "
                    f"{tuple(arr.shape)}; give a scalar or one per neuron"
                )
        for a in arrays:
            if not torch.isfinite(a).all():
                raise InterventionError(f"{loc}: the values hold NaN or infinity")
