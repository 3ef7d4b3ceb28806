"""The two error types every module raises: both print as one line and exit 2 at the command line."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class PipelineError(RuntimeError):
    """A user-facing failure (bad input, missing artifact): printed as one line, exit 2."""
