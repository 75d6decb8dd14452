"""Errors the CLI reports as one line (no traceback): bad input, not bugs."""


class MlaConvertError(Exception):
    """Base class: anything the user can fix by changing the command."""


class SpecError(MlaConvertError, ValueError):
    """The requested conversion does not fit the model (latent too large, heads not divisible...)."""


class UnsupportedModelError(MlaConvertError):
    """No host adapter knows this architecture, or it has no attention we can convert."""


class ModelNotFoundError(MlaConvertError):
    """A model id that is neither a local directory nor reachable on the Hub."""


class DamagedFileError(MlaConvertError):
    """A file the command reads is not what it should be: invalid JSON, truncated weights."""


class OutputError(MlaConvertError):
    """The output cannot be written there: a file in the way, no permission, no space left."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line
    error quotes of a library's multi-line one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
