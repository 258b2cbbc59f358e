"""The QuantlmError family: every error a user can act on, with a one-line message that says what to change."""


class QuantlmError(Exception):
    """Base class of every error quantlm raises on purpose. The CLI prints its message on one line, exit code 2."""


class InvalidSpecError(QuantlmError, ValueError):
    """A quantization setting is out of range or inconsistent."""


class ModelSourceError(QuantlmError):
    """A model path, alias, GGUF file or hub id cannot be resolved or loaded."""


class DataSourceError(QuantlmError):
    """A text source cannot be found, read or is too short for the request."""


class CheckpointError(QuantlmError):
    """A checkpoint is missing, unreadable, corrupt, or its output directory cannot be written."""
