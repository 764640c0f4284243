"""The original scripts' names (``entrypoints/*.py``): ``argse <command> <their args>``, with their
own spellings read as they meant them (:data:`ORIGINAL_ARGS`).
"""

from __future__ import annotations

import sys

import click

from argse import ArgseError, ArgseUsageError, first_line
from argse.cli.click_options import switch_values
from argse.cli.commands import cli
from argse.cli.errors import main
from argse.data.splits import EVAL_SPLITS


def original_evaluate_args(args: list[str]) -> list[str]:
    """The original ``evaluate_argse.py`` spellings: ``--dataset {test,val,tunev}`` names the split to
    evaluate (benchmark names and split names do not overlap, so ``--dataset digits-lt`` still names
    the benchmark), and ``--checkpoint`` the model (a run id or model URI)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if name == "--dataset" and value in EVAL_SPLITS:
            out += ["--split", value]
            i += 1 if eq else 2
        elif name == "--checkpoint":
            out.append("--model-uri" + (f"={value}" if eq else ""))
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def original_fit_args(args: list[str]) -> list[str]:
    """The original ``train_argse.py --resume``. A fit keeps no checkpoint: it takes seconds, from the
    gating and expert runs it reads. Resuming refits from the newest FINISHED selective gating run (and
    the expert runs that run read), named in one line, or says in one line that there is none."""
    if "--resume" not in args:
        return args
    from argse import stage_registry, tracking

    rest = [a for a in args if a != "--resume"]
    if any(a.partition("=")[0] == "--gating-run" for a in rest):
        raise ArgseUsageError("--resume refits from the newest finished selective gating run: leave out --gating-run")
    given = cli.commands["fit"].make_context("fit", switch_values(cli.commands["fit"].params, list(rest)),
                                             resilient_parsing=True).params
    tracking.configure(given.get("tracking_uri"))
    try:
        run = tracking.resolve_upstream("gating", "latest", dataset=given["dataset"], experiment=given.get("experiment"),
                                        lineage={stage_registry.TAG_GATING_MODE: "selective"})
    except ArgseError as exc:
        raise ArgseError(f"--resume: nothing to resume: {first_line(exc)}") from None
    click.echo(f"--resume: refitting from the newest finished selective gating run {run.info.run_id} "
               "and the expert runs it read (a fit keeps no checkpoint)")
    return ["--gating-run", run.info.run_id, *rest]


ORIGINAL_ARGS = {"evaluate": original_evaluate_args, "fit": original_fit_args}


def shim(command: str, argv: list[str] | None = None) -> None:
    """What the original scripts' names (``entrypoints/*.py``) run: ``argse <command> <their args>``, the
    original scripts' own spellings read as they meant them (:data:`ORIGINAL_ARGS`)."""
    translate = ORIGINAL_ARGS.get(command)
    main([command, *(sys.argv[1:] if argv is None else argv)],
         translate=(lambda args: [args[0], *translate(args[1:])]) if translate else None)
