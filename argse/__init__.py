"""AR-GSE: selective classification on long-tailed data, as an experiment-tracked MLflow project."""

__version__ = "0.1.0"

# Names every layer shares; kept here, free of heavy imports, so the config, the training code and the
# selective core read one declaration.
EXPERTS = ("ce", "logitadjust", "balsoftmax")  # the experts' training losses (argse.training.losses)
OBJECTIVES = ("balanced", "worst")  # what a plug-in rule is fitted for (argse.selective)
DEVICES = ("auto", "cpu", "cuda")  # --device: where expert training runs (argse.training.utils.resolve_device)
ENGINES = ("local", "ray")  # argse benchmark --engine: where its pipelines run (argse.engines)


def fmt_number(value: float) -> str:
    """How every cost, coverage, error and risk is echoed to the user: four significant digits
    (``0.0004883``, ``0.8442``, ``0.2``), the same number printed the same way in every line."""
    return f"{value:.4g}"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): how an error is said
    in one line, on the command line and in a failed run's tags."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ArgseError(Exception):
    """A failure the user can fix; its message is one line that says what is wrong and what to do.

    The CLI prints it on one line and exits with ``exit_code`` (1: the stage failed)."""

    exit_code = 1


class ArgseUsageError(ArgseError):
    """A bad option value or combination, found before any run starts (exit code 2)."""

    exit_code = 2
