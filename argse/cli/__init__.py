"""The ``argse`` command (:mod:`~argse.cli.commands`), its options derived from the configs
(:mod:`~argse.cli.click_options`), every failure as one line (:mod:`~argse.cli.errors`), and the
original scripts' spellings (:mod:`~argse.cli.shims`)."""

from argse.cli.commands import TOOLS, cli
from argse.cli.errors import main
from argse.cli.shims import shim

__all__ = ["cli", "main", "shim", "TOOLS"]
