"""How every ``argse`` process starts: the ``argse`` command, ``python -m argse`` (what ``mlflow run`` and
``torchrun`` start) and the original scripts' names. The dataset's preset may ask for portable CPU
kernels (:data:`argse.presets.PORTABLE_KERNELS`), which only the environment torch is imported in can
select; so the command line's ``--dataset`` is read first, the environment set, and only then the CLI
(and with it torch) imported."""

from __future__ import annotations

import sys

from argse.presets import dataset_in_argv, set_portable_environment


def main(shim: str | None = None) -> None:
    """Run the CLI (``argse <args>``; ``argse <shim> <args>`` for an original script's name)."""
    set_portable_environment(dataset_in_argv(sys.argv[1:], folders=shim is None))
    from argse import cli

    if shim is None:
        cli.main()
    else:
        cli.shim(shim)
