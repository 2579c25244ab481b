"""One resolver for every model and data source.

Models: ``prepare_model`` (hub, local, gguf-package) -> a prepared folder; ``load_prepared``.
Data: ``read_source`` (hub, jsonl, csv, parquet, embedded) -> a table with a role's columns;
``prepare_table`` writes a role's Parquet file. Embedded files come from ``assets``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpotox.sources.models import load_prepared, prepare_model
    from dpotox.sources.tables import ROLE_COLUMNS, prepare_table, read_source

__all__ = ["ROLE_COLUMNS", "load_prepared", "prepare_model", "prepare_table", "read_source"]

# Each name is imported from its module on first use: the model side pulls in torch and
# transformers' model loading (about 6 s on 2 cores), which rule prepare_data, a table job of
# a fraction of a second, should not pay.
_HOME = {
    "load_prepared": "models",
    "prepare_model": "models",
    "ROLE_COLUMNS": "tables",
    "prepare_table": "tables",
    "read_source": "tables",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"dpotox.sources.{_HOME[name]}"), name)
    raise AttributeError(f"module 'dpotox.sources' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
