"""One declaration per option: each stage's config dataclass declares its options, and the CLI (stage
commands and `argse pipeline`), MLproject, params / the config hash and the resume restore derive
from it. Each test pins one drift that used to exist; the original scripts' spellings too."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import click
import pytest
import yaml
from mlflow.tracking import MlflowClient

from argse import __version__, mlproject, stage_registry
from argse.cli import cli, shim
from argse.presets import PRESETS
from argse.config import STAGE_CONFIGS, ExpertsConfig, GatingConfig, StageConfig
from argse.options import Option, options
from argse.pipeline_config import PipelineConfig, pipeline_options
from argse.expert_runs.resume import config_from_run
from conftest import REPO, subprocess_env

NOT_OPTIONS = {"help", "version", "tracking_uri", "experiment"}  # click's own; set by `mlflow run` itself


def _other_value(opt: Option, current):
    """A valid value of ``opt`` other than ``current`` (its resolved value)."""
    if opt.choices is not None:
        return next(c for c in opt.choices if c != current)
    if opt.kind is bool:
        return not current
    if opt.kind is tuple:
        return (max(current) + 50, *current)
    if opt.kind is int:
        return (current or 0) + 1
    if opt.kind is float:
        return round((current or 0.0) * 0.5 + 0.25, 6)
    if opt.name == "coverage_grid":
        return "0.9,0.5"
    if opt.name == "weights":  # a file that exists (what it holds is read only when training starts)
        return __file__
    return f"{current}-other"


# -- the pipeline: one declaration, passed on ----------------------------------------------------------


def _pipeline_config(cli_runner, monkeypatch, *args):
    captured = {}
    from argse.stages import pipeline

    monkeypatch.setattr(pipeline, "run", lambda cfg, experiment=None: captured.setdefault("cfg", cfg))
    result = cli_runner("pipeline", "--dataset", "digits-lt", *args)
    assert result.code == 0, result.err
    return captured["cfg"].stage_configs()


def test_pipeline_cost_reaches_the_selective_gate_and_the_fit(store, cli, monkeypatch):
    configs = _pipeline_config(cli, monkeypatch, "--cost", "0.1")
    assert configs["gating-selective"].cost == 0.1 and configs["argse"].cost == 0.1
    assert configs["gating-pretrain"].cost == GatingConfig.cost  # pretrain does not use it: its hash stays
    # today's pipeline names keep working, and reach the field they always meant
    configs = _pipeline_config(cli, monkeypatch, "--epochs", "4", "--gating-epochs", "11", "--selective-rounds", "3",
                               "--eg-rounds", "7", "--seed", "5", "--test-prior", "balanced")
    assert configs["experts"].epochs == 4 and configs["gating-pretrain"].epochs == configs["gating-selective"].epochs == 11
    assert configs["gating-selective"].rounds == 3 and configs["argse"].rounds == 7
    assert {c.seed for c in configs.values()} == {5}
    assert configs["gating-selective"].test_prior == configs["argse"].test_prior == configs["evaluate"].test_prior == "balanced"


def test_every_pipeline_option_reaches_each_stage_that_declares_it_and_no_other():
    defaults = PipelineConfig(dataset="digits-lt").resolve().stage_configs()
    for p in pipeline_options():
        step, opt = p.targets[0]
        value = _other_value(opt, getattr(defaults[step], opt.name))
        configs = PipelineConfig(dataset="digits-lt", stage_options={p.name: value}).resolve().stage_configs()
        for step_name, config in configs.items():
            targeted = [o for s, o in p.targets if s == step_name]
            if not targeted:  # a stage that does not declare it is left as it was
                assert config == defaults[step_name], (p.name, step_name)
            for o in targeted:
                assert getattr(config, o.name) == o.cast(value), (p.name, step_name, o.name)


def test_pipeline_names_are_unambiguous_and_alike_where_shared():
    own = {o.name for o in options(PipelineConfig)}
    for p in pipeline_options():
        assert p.name not in own, p.name
        kinds = {(o.kind, o.choices, o.preset) for _, o in p.targets}
        assert len(kinds) == 1, (p.name, kinds)  # one pipeline option cannot mean two kinds of value
    # fields named alike that mean different things get the pipeline name they declare
    names = {p.name: {s for s, _ in p.targets} for p in pipeline_options()}
    assert names["epochs"] == {"experts"} and names["gating_epochs"] == {"gating-pretrain", "gating-selective"}
    assert names["selective_rounds"] == {"gating-selective"} and names["eg_rounds"] == {"argse"}
    assert names["cost"] == names["objective"] == {"gating-selective", "argse"}


@pytest.mark.parametrize("dataset", list(PRESETS))
def test_the_pipeline_has_no_defaults_of_its_own(dataset):
    """checkpoint_every was 10 in the stage and 5 in the pipeline, the selective rounds 4 / 10 and 2 / 5:
    now a pipeline left at its defaults runs every stage at that stage's own defaults."""
    configs = PipelineConfig(dataset=dataset).resolve().stage_configs()
    for plan in stage_registry.PIPELINE_PLAN:
        mode = {"mode": plan.mode} if plan.mode else {}
        assert configs[plan.name] == STAGE_CONFIGS[plan.stage.name](dataset=dataset, **mode).resolve(), plan.name
    assert configs["experts"].checkpoint_every == ExpertsConfig.checkpoint_every
    assert configs["gating-selective"].rounds == GatingConfig.rounds
    assert configs["gating-selective"].epochs_per_round == GatingConfig.epochs_per_round
    # and the pipeline command's defaults are the stage commands'
    pipeline = {p.name: p for p in cli.commands["pipeline"].params}
    for p in pipeline_options():
        for step, opt in p.targets:
            stage = next(s.stage for s in stage_registry.PIPELINE_PLAN if s.name == step)
            stage_param = next(q for q in cli.commands[stage.command].params if q.name == opt.name)
            assert pipeline[p.name].default in (None, stage_param.default), (p.name, step)


# -- MLproject ---------------------------------------------------------------------------------------------


def test_mlproject_is_what_the_configs_generate():
    assert (REPO / "MLproject").read_text() == mlproject.render(), \
        "MLproject differs from the stage configs: run `python -m argse.mlproject > MLproject`"


def test_mlproject_matches_the_commands_both_ways():
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for stage in stage_registry.STAGES.values():
        entry = project[stage.entry_point]
        params = {p.name: p for p in cli.commands[stage.command].params if p.name not in NOT_OPTIONS}
        # every option is a parameter, every parameter an option
        assert set(entry["parameters"]) == set(params), (stage.entry_point, set(entry["parameters"]) ^ set(params))
        command = " ".join(entry["command"].split())
        for name, param in params.items():
            if param.required:  # no default: `mlflow run` asks for it, as the command does
                assert "default" not in entry["parameters"][name], (stage.name, name)
                continue
            default = entry["parameters"][name]["default"]
            if param.is_flag:
                assert default in ("true", "false") and (default == "true") == param.default, (stage.name, name)
            else:  # the parameter's default, read as the command reads it, is the option's default
                def read(value, param=param):
                    return None if value is None else param.type.convert(value, param, None)

                assert read(default) == read(param.default), (stage.name, name, default)
            assert f"--{name.replace('_', '-')} {{{name}}}" in command, (stage.name, name)


@pytest.mark.slow
def test_mlflow_run_cost_reaches_the_selective_gate(store, tmp_path):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "-P", "dataset=digits-lt",
           "-P", "cost=0.1", "-P", "epochs=1", "-P", "gating_epochs=2", "-P", "selective_rounds=1",
           "-P", "epochs_per_round=1", "-P", "eg_rounds=2", "-P", "stop_at=argse", "-P", "verbose=false"]
    done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (selective,) = [r for r in runs if r.data.tags.get(stage_registry.TAG_GATING_MODE) == "selective"]
    (fit,) = [r for r in runs if r.data.tags.get("argse.stage") == "argse"]
    assert float(selective.data.params["cost"]) == 0.1 and float(fit.data.params["cost"]) == 0.1
    assert selective.data.params["rounds"] == "1" and fit.data.params["rounds"] == "2"


# -- params, the hash and the resume restore ---------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STAGE_CONFIGS.values()))
def test_params_are_the_hashed_options(cls):
    mode = {"mode": "selective"} if cls is GatingConfig else {}
    cfg = cls(dataset="digits-lt", **mode).resolve()
    assert set(cfg.params()) == {o.name for o in options(cls) if o.hashed}
    assert not {"verbose", "dry_run", "resume", "save_results", "output_dir"} & set(cfg.params())


def test_resume_restores_every_hashed_option():
    """A resumed expert run continues with every option it was started with, not the CLI's defaults."""
    started = ExpertsConfig(dataset="digits-lt").resolve()
    started = dataclasses.replace(started, **{
        o.name: _other_value(o, getattr(started, o.name)) for o in options(ExpertsConfig)
        if o.hashed and o.name not in ("dataset", "expert", "splits_run")}).resolve()
    logged = {k: str(v) for k, v in started.params().items()}
    logged["epochs"], logged["epochs.resolved"] = "preset", logged["epochs"]  # as `mlflow run` logs it
    run = SimpleNamespace(data=SimpleNamespace(params=logged, tags={
        "argse.expert": "logitadjust", "argse.upstream.splits": "s" * 32}))
    restored = config_from_run(run, ExpertsConfig(dataset="digits-lt", resume="r" * 32).resolve())
    expected = dataclasses.replace(started, expert="logitadjust", splits_run="s" * 32)
    assert restored.params() == expected.params()
    assert restored.resume == "r" * 32


# -- the CLI as a new user meets it --------------------------------------------------------------------------


def test_switches_are_flags_in_help_and_still_take_true_or_false(store, cli):
    for name, command in cli_commands():
        text = command.get_help(click.Context(command, info_name=name))
        assert "BOOLEAN" not in text, name
    result = cli("splits", "--dataset", "digits-lt", "--dry-run", "true", "--verbose", "false")
    assert result.code == 0 and "dry run: no run created" in result.out, result.err
    assert cli("splits", "--dataset", "digits-lt", "--dry-run=maybe").err.startswith("error: --dry-run is a switch")
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


def test_a_top_level_switch_keeps_its_sub_command(store, cli):
    result = cli("--verbose", "splits", "--dataset", "digits-lt", "--dry-run")
    assert result.code == 0, result.err
    assert "dry run: no run created" in result.out


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"argse {__version__}"


def cli_commands():
    return [(name, command) for name, command in cli.commands.items()] + [("argse", cli)]


def test_every_option_has_help_and_preset_options_show_each_preset():
    for name, command in cli_commands():
        for param in command.params:
            if isinstance(param, click.Argument):  # a positional argument is explained in the command's help
                assert param.name.upper() in (command.help or ""), (name, param.name)
            else:
                assert isinstance(param, click.Option) and (param.help or "").strip(), (name, param.name)
    experts = cli.commands["experts"]
    text = experts.get_help(click.Context(experts, info_name="experts", terminal_width=300, max_content_width=300))
    assert "(default: preset; cifar100-lt 200, digits-lt 30, fashion-mnist-lt 20)" in text
    for cls in (*STAGE_CONFIGS.values(), StageConfig):
        for o in options(cls):
            assert o.help.strip(), (cls.__name__, o.name)
            if o.preset:
                assert o.preset_values().split(", ")[1].startswith("digits-lt "), (cls.__name__, o.name)


# -- the original scripts' spellings -----------------------------------------------------------------------------------


def test_seed_evaluate_dataset_names_the_split(chain_store, capsys):
    with pytest.raises(SystemExit) as exit_:
        shim("evaluate", ["--dataset", "digits-lt", "--dataset", "val", "--n-boot", "5", "--coverage-grid", "1,0.5"])
    assert exit_.value.code == 0, capsys.readouterr().err
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.\"argse.stage\" = 'evaluate'")
    assert [r.data.params["split"] for r in runs] == ["val"]
    assert runs[0].data.tags["argse.dataset"] == "digits-lt"


def test_seed_fit_resume_refits_from_the_newest_selective_gating_run(chain_store, capsys):
    _, ids = chain_store
    with pytest.raises(SystemExit) as exit_:
        shim("fit", ["--dataset", "digits-lt", "--resume", "--rounds", "3"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    assert f"--resume: refitting from the newest finished selective gating run {ids['selective']}" in out.out
    client = MlflowClient()
    newest = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.\"argse.stage\" = 'argse'", order_by=["attributes.start_time DESC"])[0]
    assert newest.info.run_id != ids["argse"] and newest.data.tags["argse.upstream.gating"] == ids["selective"]


def test_seed_fit_resume_with_nothing_to_resume_says_so_in_one_line(store, capsys):
    with pytest.raises(SystemExit) as exit_:
        shim("fit", ["--dataset", "digits-lt", "--resume"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.startswith("error: --resume: nothing to resume: no FINISHED gating run for digits-lt") and err.count("\n") == 1, err


def test_label_smoothing_outside_zero_one_is_a_usage_error(cli):
    result = cli("experts", "--dataset", "digits-lt", "--label-smoothing", "1", "--dry-run")
    assert result.code == 2 and "--label-smoothing 1 must lie in [0, 1)" in result.err
