"""The QuantlmError family: every error a user can act on, with a one-line message that says what to change."""

import errno


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


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: enough of a foreign exception to say what went wrong in one line."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_NO_PERMISSION = (errno.EACCES, errno.EPERM)
_NOT_A_DIRECTORY = (errno.EEXIST, errno.ENOTDIR)  # a file stands where a directory must be (or be made)


def os_error_message(error: BaseException) -> str | None:
    """What a file-system error means for the user and what to change, in one line; None if it is none of the
    known kinds (a full disk, a read-only file system, a missing permission, a file where a directory must be).
    Rust-backed writers (safetensors) report a full disk in their message rather than as an OSError, so that is
    recognised too."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and "No space left on device" in str(error):
        code = errno.ENOSPC
    filename = getattr(error, "filename", None)
    where = f" ({filename})" if filename else ""
    if code in _DISK_FULL:
        return (
            f"no space left on the disk{where}: free some space or write to another disk, then rerun (completed "
            "outputs were not touched; quantize and generate-data resume from their finished work)"
        )
    if code in _READ_ONLY:
        return f"the file system is read-only{where}: choose an output (--out) on a writable disk"
    if code in _NO_PERMISSION:
        return (
            f"permission denied{where}: quantlm may not read or write that path; fix its permissions, or choose an "
            "output (--out) in a directory you can write"
        )
    if code in _NOT_A_DIRECTORY:
        return (
            f"a file stands where a directory is needed{where}: choose an output (--out) whose parent directories "
            "are directories, or move that file"
        )
    return None
