"""One family of errors, so the CLI can turn any of them into a one-line message."""


class SpilloverError(Exception):
    """Base of every error spillover raises on purpose; its message is shown to users as is."""


class ConfigError(SpilloverError):
    """A configuration value or argument is invalid; the message names the field and valid choices."""


class OtherInputsError(ConfigError):
    """A run folder holds a finished job made from other inputs; `differ` names them."""

    def __init__(self, message: str, differ: list[str]):
        super().__init__(message)
        self.differ = differ


class InputError(SpilloverError):
    """An input file is unreadable or malformed; the message names the file and line."""


def shown(value: object, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: a message quotes the bad value without ever
    growing to the size of the input (a 10 MB line) or breaking onto a second line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
