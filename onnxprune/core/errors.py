"""Errors meant for the user: one line, naming the node, tensor, option or file at fault."""
from __future__ import annotations

import re


class OnnxPruneError(Exception):
    """A problem with the user's input or request. The CLI prints it as one line and exits 2."""


class RuntimeMissing(OnnxPruneError):
    """A feature needs an onnxruntime flavour that is not importable."""


_OPTION_REF = re.compile(r"\{([a-z_]+)\}")


class OptionError(OnnxPruneError):
    """An option's value cannot be used. Named by option, as the Python API spells it
    (`filters=1.5: must be in [0, 1)`); the CLI renders the same error with its flags
    (`--filters 1.5: must be in [0, 1)`). `{name}` in the reason refers to another option
    and is rendered the same way."""

    def __init__(self, option: str, value, reason: str) -> None:
        self.option, self.value, self.reason = option, value, reason
        super().__init__(self.render())

    def render(self, name=lambda option: option, value_text=repr) -> str:
        """The message with options named by `name(option)` and the value shown by `value_text`."""
        reason = _OPTION_REF.sub(lambda m: name(m.group(1)), self.reason)
        if self.value is None:
            return f"{name(self.option)}: {reason}"
        joiner = "=" if name(self.option) == self.option else " "
        return f"{name(self.option)}{joiner}{value_text(self.value)}: {reason}"


class VerificationError(OnnxPruneError):
    """The pruned model failed verification; `result` holds the model and report anyway."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
