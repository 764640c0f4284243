"""Every failure of an ``argse`` command as one line on stderr and an exit code (:func:`main`): 2 for
bad usage, 1 for a failed stage, 130 when interrupted; the tracking server's failures said as the
server's (:func:`argse.tracking.server_problem`); with ``--verbose`` the traceback first.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

import click

from argse import ArgseError, first_line
from argse.cli.commands import cli


def _server_problem(exc: BaseException) -> str | None:
    """The one line for a failure that is the tracking server's (unreachable, frozen, its database
    down, credentials refused), also when a stage wrapped it in its own message; else ``None``."""
    if "argse.tracking" not in sys.modules:  # failed before any tracking happened
        return None
    from argse import tracking

    return tracking.server_problem(exc)


def _verbose_requested(args: list[str]) -> bool:
    """Whether ``--verbose`` is on, before click parses (errors while parsing need to know)."""
    for i, arg in enumerate(args):
        if arg == "--verbose":
            following = args[i + 1].lower() if i + 1 < len(args) else ""
            return following not in ("false", "0", "no", "off", "f", "n")
    return False


def main(argv: list[str] | None = None, translate: Callable[[list[str]], list[str]] | None = None) -> None:
    """Console entry point: runs the CLI and turns every failure into one line and an exit code.
    ``translate`` rewrites the arguments first (the original scripts' spellings, :func:`argse.cli.shims.shim`),
    inside that handling."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("argse").setLevel(logging.INFO)
    # Connection retries are reported once, as the one-line error; not as urllib3's warnings.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    args = sys.argv[1:] if argv is None else list(argv)
    if _verbose_requested(args):
        logging.getLogger("argse").setLevel(logging.DEBUG)
    code = 0
    try:
        if translate is not None:
            args = translate(args)
        cli.main(args=args, prog_name="argse", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = 130
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    except ArgseError as exc:
        if _verbose():
            traceback.print_exc()
        click.echo(f"error: {_server_problem(exc) or first_line(exc)}", err=True)
        code = exc.exit_code
    except Exception as exc:  # anything else: still one line, the traceback on request
        if _verbose():
            traceback.print_exc()
        problem = _server_problem(exc)
        if problem:
            click.echo(f"error: {problem}", err=True)
        else:
            hint = "" if _verbose() else " (rerun with --verbose for the traceback)"
            click.echo(f"error: {type(exc).__name__}: {first_line(exc)}{hint}", err=True)
        code = 1
    sys.exit(code)


def _verbose() -> bool:
    """Whether ``--verbose`` is on: it sets the argse logger to DEBUG, where it is given."""
    return logging.getLogger("argse").isEnabledFor(logging.DEBUG)
