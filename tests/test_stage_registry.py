"""The stage registry is the one declaration of each stage's names, inputs, tags and artifact paths:
the pipeline, the CLI, MLproject and the "run this first" hints agree with it; and the training code
and the selective core stay free of MLflow and of the CLI's config."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from argse import EXPERTS, OBJECTIVES, config, stage_registry, tracking
from argse.cli import cli
from argse.stage_registry import PIPELINE_PLAN, PIPELINE_STEPS, STAGES
from argse.stages import pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"splits": config.SplitsConfig, "experts": config.ExpertsConfig, "gating": config.GatingConfig,
           "argse": config.ArgseConfig, "evaluate": config.EvaluateConfig, "pipeline": config.PipelineConfig}


def _choices(command: str, option: str) -> tuple[str, ...]:
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice), f"{command} --{option} is not a choice"
    return tuple(param.type.choices)


def test_pipeline_steps_and_plan_come_from_the_registry():
    assert PIPELINE_STEPS == ("data", "experts", "gating", "argse", "eval")
    assert dict(config.PipelineConfig.__dataclass_fields__["stop_at"].metadata)["choices"] == PIPELINE_STEPS
    assert [p.name for p in PIPELINE_PLAN] == ["splits", "experts", "gating-pretrain", "gating-selective",
                                               "argse", "evaluate"]
    # the plan follows the step order, and every stage with a step is in it
    assert [PIPELINE_STEPS.index(p.stage.step) for p in PIPELINE_PLAN] == sorted(
        PIPELINE_STEPS.index(p.stage.step) for p in PIPELINE_PLAN)
    assert {p.stage.name for p in PIPELINE_PLAN} == {s.name for s in STAGES.values() if s.step}


def test_the_pipeline_wires_each_stage_from_its_declared_inputs():
    plan = pipeline.Pipeline(config.PipelineConfig(dataset="digits-lt").resolve(), None)
    experts = ",".join(f"{i:032x}" for i in range(len(EXPERTS)))
    plan.ids = {"splits": "s" * 32, "experts": experts, "gating-pretrain": "p" * 32, "gating-selective": "g" * 32,
                "argse": "a" * 32}
    wired = {step.name: plan._wire(step) for step in PIPELINE_PLAN}
    assert wired["splits"][1] == {}
    assert wired["experts"][0].splits_run == "s" * 32 and wired["experts"][1] == {"splits_run": "s" * 32}
    assert wired["gating-pretrain"][1] == {"experts_run": experts, "splits_run": "s" * 32}
    assert wired["gating-selective"][0].pretrain_run == "p" * 32
    assert wired["argse"][0].gating_run == "g" * 32
    evaluate_config, evaluate_upstream = wired["evaluate"]
    assert evaluate_config.model_uri == "a" * 32
    assert evaluate_upstream == {"argse_run": "a" * 32, "gating_run": "g" * 32, "experts_run": experts,
                                 "splits_run": "s" * 32}
    # the keys the stage itself tags and hashes its run with
    assert evaluate_upstream == STAGES["evaluate"].upstream(argse="a" * 32, gating="g" * 32, experts=experts,
                                                            splits="s" * 32)


def test_cli_commands_and_choices_agree_with_the_registry():
    from argse.cli import TOOLS

    assert set(cli.commands) == {s.command for s in STAGES.values()} | set(TOOLS)
    assert _choices("pipeline", "start_from") == PIPELINE_STEPS
    assert _choices("pipeline", "stop_at") == PIPELINE_STEPS
    assert _choices("gating", "mode") == STAGES["gating"].modes


def test_mlproject_entry_points_are_the_registry_s():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(project["entry_points"]) == {s.entry_point for s in STAGES.values()}
    for stage in STAGES.values():
        command = " ".join(project["entry_points"][stage.entry_point]["command"].split())
        assert command.startswith(f"python -m argse {stage.command} "), (stage.name, command)


def test_producer_hints_name_real_commands():
    assert STAGES["argse"].producer() == "argse fit"
    assert STAGES["gating"].producer() == "argse gating --mode pretrain"
    assert STAGES["gating"].producer({stage_registry.TAG_GATING_MODE: "selective"}) == "argse gating --mode selective"
    for stage in STAGES.values():
        words = stage.producer().split()
        assert words[0] == "argse" and words[1] in cli.commands


def test_every_input_names_a_pipeline_step_and_a_config_field():
    steps = {p.name: p for p in PIPELINE_PLAN}
    for plan in PIPELINE_PLAN:
        fields = {f.name for f in dataclasses.fields(CONFIGS[plan.stage.name])}
        for one in plan.inputs:
            assert one.step in steps and list(steps).index(one.step) < list(steps).index(plan.name), (plan.name, one)
            assert one.option is None or one.option in fields, (plan.name, one.option)
    # the one input that depends on the mode: selective gating starts from a pretrain run
    assert [i.key for i in steps["gating-pretrain"].inputs] == ["experts", "splits"]
    assert [i.key for i in steps["gating-selective"].inputs] == ["experts", "splits", "pretrain"]


def test_upstream_takes_exactly_the_declared_inputs():
    gating = STAGES["gating"]
    assert gating.upstream("selective", experts="a,b,c", splits="s", pretrain="p") == {
        "experts_run": "a,b,c", "splits_run": "s", "pretrain_run": "p"}
    with pytest.raises(ValueError, match="the gating stage \\(pretrain\\) reads experts, splits; got experts, pretrain, splits"):
        gating.upstream("pretrain", experts="a,b,c", splits="s", pretrain="p")
    with pytest.raises(ValueError, match="reads splits; got nothing"):
        STAGES["experts"].upstream()


def test_a_stage_name_no_stage_has_fails_in_one_line():
    with pytest.raises(ValueError, match="no stage 'fit': the stages are splits, experts, gating, argse, evaluate, pipeline"):
        stage_registry.stage("fit")


def test_expert_run_ids_round_trip_through_their_tags():
    ids = {name: f"{i:032x}" for i, name in enumerate(EXPERTS)}
    tags = {stage_registry.expert_run_tag(n): i for n, i in ids.items()}
    assert stage_registry.expert_runs_of_parent(tags) == ids
    assert stage_registry.split_expert_runs(stage_registry.join_expert_runs(ids)) == ids
    assert stage_registry.split_expert_runs("") is None and stage_registry.split_expert_runs("a,b") is None


def _string_constants(module) -> dict[str, str]:
    return {name: value for name, value in vars(module).items()
            if name.isupper() and isinstance(value, str) and value.startswith(("argse.", ))}


def test_tag_and_artifact_names_are_spelled_only_in_the_registry():
    """A stage reads a tag or artifact through the registry's constant, never a literal of its own."""
    tags = {**_string_constants(stage_registry), **_string_constants(tracking)}
    paths = [stage_registry.GATE, stage_registry.GATE_META, stage_registry.GATE_RULE, stage_registry.RULE,
             stage_registry.EG_HISTORY, stage_registry.CHECKPOINT, stage_registry.LOGITS.split("{")[0],
             f"{stage_registry.RESULTS_DIR}/{stage_registry.RESULTS_TABLE}"]
    owners = {REPO / "argse" / "stage_registry.py", REPO / "argse" / "tracking" / "tags.py"}
    found = []
    for path in sorted((REPO / "argse").rglob("*.py")):
        if path in owners:
            continue
        text = path.read_text()
        for literal in [*tags.values(), *paths]:
            if re.search(r"[\"']" + re.escape(literal), text):
                found.append(f"{path.relative_to(REPO)}: {literal}")
    assert not found, found


def test_selective_core_training_and_data_code_import_neither_mlflow_nor_the_config():
    code = (
        "import sys\n"
        "import argse.selective, argse.selective.compare, argse.selective.matched, argse.selective.seeds, argse.training\n"
        "import argse.training.losses, argse.training.calibration, argse.training.gating, argse.training.utils\n"
        "import argse.models.backbones, argse.models.experts, argse.models.gating\n"
        "import argse.data.loaders, argse.data.splits, argse.data.device, argse.data.folder, argse.data.stream\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'click') or m == 'argse.config'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_registry_and_the_shared_names_import_nothing_heavy():
    code = ("import sys\nimport argse.stage_registry\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'numpy', 'click')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    assert OBJECTIVES == ("balanced", "worst") and config.OBJECTIVES is OBJECTIVES and config.EXPERTS is EXPERTS
