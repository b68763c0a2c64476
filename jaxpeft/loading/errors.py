"""Error types raised by checkpoint loading and asset fetching (imports only jaxpeft.errors)."""

from jaxpeft.errors import JaxpeftError


class CheckpointError(JaxpeftError, ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the model; the message says which and how to fix it."""
