"""One resolver for every model and data source.

Models: ``prepare_model`` (hub, local, gguf-package) -> a prepared folder; ``load_prepared``.
Data: ``read_source`` (hub, jsonl, csv, parquet, embedded) -> a table with a role's columns;
``prepare_table`` writes a role's Parquet file. Embedded files come from ``assets``.
"""

from dpotox.sources.models import load_prepared, prepare_model
from dpotox.sources.tables import ROLE_COLUMNS, prepare_table, read_source

__all__ = ["ROLE_COLUMNS", "load_prepared", "prepare_model", "prepare_table", "read_source"]
