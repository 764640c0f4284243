"""AR-GSE: selective classification on long-tailed data, as an experiment-tracked MLflow project."""

__version__ = "0.1.0"


class ArgseError(Exception):
    """A failure the user can fix; its message is one line that says what is wrong and what to do.

    The CLI prints it on one line and exits with ``exit_code`` (1: the stage failed)."""

    exit_code = 1


class ArgseUsageError(ArgseError):
    """A bad option value or combination, found before any run starts (exit code 2)."""

    exit_code = 2
