"""Errors a user can act on: each message names the problem and the fix."""


class IDGenError(Exception):
    """Base class for every error idgen raises on bad input."""


class ImageError(IDGenError, ValueError):
    """An image is missing, unreadable, corrupt, truncated or too large."""


class NoFaceError(IDGenError, ValueError):
    """No face (or not the requested face) was found in an image."""


class CheckpointError(IDGenError, ValueError):
    """A checkpoint is unreadable or does not match the model it is loaded into."""


class ModelNotFoundError(IDGenError, FileNotFoundError):
    """A model (face pack, base model, adapter) cannot be found locally or downloaded."""


class IdentityInputError(IDGenError, ValueError):
    """Identity arguments that do not fit the loaded adapter (e.g. too many faces for it)."""
