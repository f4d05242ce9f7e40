"""Errors the model server turns into HTTP status codes (bad input -> 400, unknown model -> 404).

Messages are sentences that say what was expected, so a client can fix the request.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """The request is malformed: wrong tensor name, shape, dtype, an undecodable image, empty text."""


class ModelNotFoundError(LookupError):
    """No model (or version) of that name is loaded."""


class ModelNotReadyError(RuntimeError):
    """The model exists in the repository but is not loaded."""
