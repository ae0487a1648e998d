"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class NeuroSDMError(Exception):
    """Base class: the message says what was wrong and what to do."""


class CheckpointError(NeuroSDMError):
    """A checkpoint file is missing, truncated, foreign or inconsistent."""


class DatasetError(NeuroSDMError):
    """A dataset is missing or malformed."""


class ConfigError(NeuroSDMError):
    """An option or configuration value is invalid."""


class QuantizationError(NeuroSDMError):
    """A tensor or a neuron parameter cannot be represented with the chosen fixed-point format."""


class GraphError(NeuroSDMError):
    """A NIR graph (or the inputs given to it) cannot be run: unsupported node, shape mismatch, missing input."""


class OutputError(NeuroSDMError):
    """An output cannot be written: the location is not writable, is the command's own input, already exists
    (without --force), or the disk is full."""
