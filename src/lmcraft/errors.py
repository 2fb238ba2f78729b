"""User-facing errors: the CLI prints these as one paragraph (no traceback unless --debug)."""

from __future__ import annotations


class LmcraftError(Exception):
    """An error caused by the user's input (config, file, model folder), explained in words."""


class ConfigError(LmcraftError):
    """A config key is unknown, mistyped, missing or out of range."""


class InputFileError(LmcraftError):
    """A data file is unreadable or malformed; the message names the file and the line/record."""

    def __init__(self, path: object, where: object, expected: str) -> None:
        super().__init__(f"{path}, {where}: {expected}")
        self.path, self.where, self.expected = path, where, expected


class ModelLoadError(LmcraftError):
    """A model folder cannot be loaded: unsupported type, missing or corrupt tensors."""
