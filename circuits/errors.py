"""The exception hierarchy: every error the package raises on purpose is a `CircuitsError`.

Messages are one line that says what was wrong and how to fix it; the CLI prints them as they are.
"""


class CircuitsError(Exception):
    """Base class of every error raised by circuits on purpose."""


class ModelLoadError(CircuitsError):
    """A model or tokenizer could not be loaded."""


class UnsupportedModelError(CircuitsError):
    """The edge-level engine has no adapter for this architecture, or the modules node-level
    patching needs (layers, attention output projection, MLP) could not be found."""


class TaskError(CircuitsError):
    """A behavior (task) definition or data file is invalid."""


class CircuitFileError(CircuitsError):
    """A saved circuit file is malformed, truncated or of an unknown version."""


class OptionError(CircuitsError):
    """An option has a value that is not allowed."""


class DependencyError(CircuitsError):
    """A program or optional package the requested feature needs is not installed."""


class BehaviorError(CircuitsError):
    """The model barely shows the behavior (raised instead of a warning with ``strict=True``)."""
