"""Errors that dpotox raises for bad input: each message names the thing and the fix."""


class DpotoxError(Exception):
    """Base class: a problem the user can fix (config, missing file, unreachable source)."""


class ConfigError(DpotoxError, ValueError):
    """The configuration breaks the schema or points at something that does not exist."""


class SourceError(DpotoxError, RuntimeError):
    """A model or data source cannot be read; the message names the config key to change."""


class UnsupportedModelError(DpotoxError, ValueError):
    """A model whose architecture family dpotox does not know."""


class PairsError(DpotoxError, ValueError):
    """Preference pairs that cannot be trained on; the message names the file and row."""


class DPOError(DpotoxError, ValueError):
    """Preference pairs or a checkpoint folder that DPO cannot work with."""


class NeuronsError(DpotoxError, ValueError):
    """Inputs of the neuron table that do not fit together; the message names them."""


class TablesError(DpotoxError, ValueError):
    """Evaluation outputs or a published-numbers file that the tables cannot be built from."""
