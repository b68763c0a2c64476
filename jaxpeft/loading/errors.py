"""Error types raised by checkpoint loading and asset fetching (imports nothing from jaxpeft)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the model; the message says which and how to fix it."""
