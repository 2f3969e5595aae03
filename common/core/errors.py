"""Exceptions callers can tell apart (modelled on Opacus' ``validators/errors.py``)."""

from __future__ import annotations


class DifusalError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(DifusalError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed range."""


class DataError(DifusalError, ValueError):
    """Input data is malformed; the message names the file, the row and the fix."""


class BudgetExceededError(DifusalError, RuntimeError):
    """A training step would take a site's privacy spend past its (epsilon, delta) budget."""


class ReplyValidationError(DifusalError, ValueError):
    """A site's reply (weights, metrics or samples) failed validation and was not used."""
