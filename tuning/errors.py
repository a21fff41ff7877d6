"""Errors of the tuning tools (``simulate``, ``profile``).

    TokenScalerError                 (token_scaler.errors)
    ├── ConfigError
    │   ├── TraceError               a trace file cannot be read or has a bad row
    │   └── ProfileFileError         a replica profile file is missing a field or has a bad value
    └── TuningError
        └── EndpointError            the endpoint under ``profile`` does not answer as an
                                     OpenAI-compatible server should

The ``ConfigError`` ones are input mistakes: the CLI reports them and exits 2.
"""

from __future__ import annotations

from token_scaler.errors import ConfigError, TokenScalerError


class TraceError(ConfigError):
    """A trace file cannot be read; the message names the file (and line)."""


class ProfileFileError(ConfigError):
    """A replica profile file is unusable; the message names the file and field."""


class TuningError(TokenScalerError):
    """Base of the run-time errors of the tuning tools."""


class EndpointError(TuningError):
    """The endpoint under test failed in a way that makes the measurement meaningless."""
