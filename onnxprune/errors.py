"""Errors meant for the user: one line, naming the node, tensor, flag or file at fault."""


class OnnxPruneError(Exception):
    """A problem with the user's input or request. The CLI prints it as one line and exits 2."""


class RuntimeMissing(OnnxPruneError):
    """A feature needs an onnxruntime flavour that is not importable."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
