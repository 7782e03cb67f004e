"""Our exception types. Library code raises these; only the CLI turns them into exit codes."""


class EdgeLoraError(Exception):
    """Base of every error edgelora raises on purpose."""

    exit_code = 1


class UserInputError(EdgeLoraError):
    """The user's input (a folder, a file, a flag, a request) is wrong: exit code 2.

    ``param``: the request field at fault, when there is one (the server's 400 names it)."""

    exit_code = 2

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param


class UnsupportedModelError(UserInputError):
    """The model's architecture or a feature it uses is not supported."""


class AdapterError(UserInputError):
    """A LoRA adapter is malformed, unsupported, or does not fit the base model."""


class RuntimeFailure(EdgeLoraError):
    """ONNX Runtime or the device failed while running a valid model (out of memory, a kernel error).

    Not the user's input: exit code 1, and the message says what failed instead of blaming the input.
    """

    exit_code = 1
