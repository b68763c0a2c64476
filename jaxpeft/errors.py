"""The library's error types and the CLI's exit codes: every mistake a user can make ends in a `JaxpeftError`
whose message names the problem and the fix. Imports nothing (every layer may import it).
"""
from __future__ import annotations

EXIT_USER_ERROR = 2
"""`jaxpeft` exit code for a user error (bad config, bad file, bad data): fix the input, do not retry as is."""

EXIT_PREEMPTED = 75
"""`jaxpeft train` exit code after SIGTERM/SIGINT: the run wrote a checkpoint at the step it stopped; run the same
command again to resume (EX_TEMPFAIL: an orchestrator should requeue the job, not mark it done or failed)."""


EXIT_INTERRUPTED = 130
"""`jaxpeft` exit code after a second SIGINT (Ctrl-C twice): stopped at once, no checkpoint of the current step."""


class JaxpeftError(Exception):
    """Base of every error jaxpeft raises for a user's input; the message names the problem and the fix."""


class AdapterError(JaxpeftError, ValueError):
    """An adapter config that cannot be applied (targets matching nothing, a rank above a layer's dimensions, a
    method the model cannot take) or adapter state that does not fit its model."""


class ModelConfigError(JaxpeftError, ValueError):
    """A model configuration (config.json, `ModelConfig`) that jaxpeft cannot build."""


class UnsupportedError(JaxpeftError, NotImplementedError):
    """A model, file or adapter feature jaxpeft does not support (yet); the message names it and the alternative."""


class TrainingPreempted(JaxpeftError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint at `step`; the same command resumes it
    (`jaxpeft train` exits with EXIT_PREEMPTED)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
