"""Every exception helexa_native raises on purpose, in one place.

The server maps each class to one HTTP status and OpenAI error code, so new
failure kinds get a class here rather than a bare RuntimeError.
"""


class HelexaError(Exception):
    """Base class of all helexa_native errors."""


class ModelLoadError(HelexaError):
    """A model source could not be read: bad file, unknown architecture, missing tensor."""


class UnsupportedModelError(ModelLoadError):
    """The file is readable but describes something the engine does not run."""


class ShardingError(ModelLoadError, ValueError):
    """A model cannot be split across the requested number of tensor-parallel ranks."""


class LaunchError(HelexaError, ValueError):
    """The processes of a tensor-parallel launch do not fit together (count, model, settings)."""


class TokenizerError(ModelLoadError):
    """The tokenizer could not be built from the model's metadata (a load error)."""


class ChatTemplateError(HelexaError):
    """The chat template failed to parse or render."""


class InvalidParameterError(HelexaError, ValueError):
    """A request field holds a value the engine cannot use; `field` names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return type(self), (self.field, str(self))


class ContextLengthError(HelexaError, ValueError):
    """A prompt (plus requested output) does not fit the model's context."""


class DeviceError(HelexaError, RuntimeError):
    """A device worker failed (CUDA error, poisoned worker, shutdown)."""


class EngineClosedError(HelexaError, RuntimeError):
    """The engine was closed and can no longer serve requests."""


class BuildMismatchError(HelexaError, RuntimeError):
    """The installed build holds no machine code for this GPU's architecture."""


class ConstraintError(HelexaError, ValueError):
    """A structured-output request (JSON schema, regex, grammar, tools) cannot be compiled.

    `field` names the request field at fault ("response_format", "tools",
    "tool_choice") where it is known.
    """

    def __init__(self, message: str, field: "str | None" = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return type(self), (str(self), self.field)
