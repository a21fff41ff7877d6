"""The project's exception hierarchy, in one place.

    TokenScalerError
    ├── ConfigError        a setting (flag or env variable) has a bad value
    ├── RecordError        a stream entry does not follow the record contract
    ├── MetadataError      ScaledObject metadata has a bad value (scaler)
    └── RowError           a row of a CSV input (billing export, token counts) is malformed

Third-party exceptions are mapped to these at the boundary (``raise ... from exc``).
"""

from __future__ import annotations


class TokenScalerError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(TokenScalerError):
    """A setting has a bad value; the message names the flag or variable."""


class RecordError(TokenScalerError):
    """A stream entry cannot be decoded; the message names the field and value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field!r}={shown}: {reason}")


class MetadataError(TokenScalerError):
    """ScaledObject metadata has a bad value; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: str, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"scalerMetadata[{key!r}]={value!r} is invalid: {allowed}")


class RowError(TokenScalerError):
    """A CSV row cannot be read; the message names the file, the row and the column."""

    def __init__(self, source: str, row: int, column: str, reason: str) -> None:
        self.source = source
        self.row = row
        self.column = column
        self.reason = reason
        super().__init__(f"{source}: row {row}, column {column!r}: {reason}")
