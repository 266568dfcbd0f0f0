"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class TunelabError(Exception):
    """A mistake the user can fix (bad config, bad data, missing model). Printed without traceback."""


class ConfigError(TunelabError):
    """The recipe or a command-line override is invalid."""


class DataError(TunelabError):
    """A data file cannot be used. Names the file, and where known the row and column."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: str | None = None):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        if column is not None:
            where = f"{where} column '{column}'" if where else f"column '{column}'"
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.line, self.column = file, line, column


class ModelError(TunelabError):
    """A model cannot be resolved or loaded."""
