"""Config: YAML + CLI overrides, field-level errors, round trip through config.yaml."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_kd

from kdcore.config import RunConfig, resolve_config
from kdcore.errors import KdError


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "strategy:\n  scorer: {name: none}\n  pacing: none\n  reliance: {name: fixed, params: {value: 0.3}}\n"
        "training: {batch_size: 4, seed: 9}\n"
    )
    cfg = resolve_config(path, {"training.seed": 1, "strategy.pacing.params.s0": 0.5})
    assert cfg.training.batch_size == 4 and cfg.training.seed == 1
    assert cfg.strategy.reliance.params == {"value": 0.3}
    assert cfg.strategy.pacing.name == "none" and cfg.strategy.pacing.params == {"s0": 0.5}


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve_config(
        None, {"training.lr": 1e-3, "strategy.temperature": 1.5, "model.student": "gpt2:n_layer=1"}
    )
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert resolve_config(path) == cfg
    assert RunConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"training.batch_size": 0}, "training.batch_size: Input should be greater than 0"),
        ({"training.batch_size": "many"}, "training.batch_size: Input should be a valid integer"),
        (
            {"training.mixed_precision": "fp8"},
            "training.mixed_precision: Input should be 'no', 'fp16' or 'bf16'",
        ),
        ({"training.grad_accum": 3}, "batch_size 16 must be a multiple of grad_accum 3"),
        ({"data.colour": "red"}, "data.colour: Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(KdError) as exc:
        resolve_config(None, overrides)
    assert message in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(KdError, match=r"config file .*nope.yaml' does not exist"):
        resolve_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(KdError, match=r"must hold a mapping"):
        resolve_config(bad)


def test_epochs_alone_means_epochs():
    cfg = resolve_config(None, {"training.epochs": 2})
    assert cfg.training.max_steps is None and cfg.training.epochs == 2
    assert resolve_config(None, {}).training.max_steps == 400


def test_cli_print_config_applies_flags_over_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training: {seed: 5, batch_size: 4}\nstrategy: {reliance: none}\n")
    result = run_kd(
        "run",
        "--config",
        str(path),
        "--seed",
        "7",
        "--lambda",
        "0.2",
        "--reliance",
        "fixed",
        "--print-config",
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["training"] == {**printed["training"], "seed": 7, "batch_size": 4}
    assert printed["strategy"]["reliance"] == {"name": "fixed", "params": {"value": 0.2}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reliance", "thresh"], "unknown reliance 'thresh'; known:"),
        (["--batch-size", "0"], "invalid config: training.batch_size: Input should be greater than 0"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--reliance", "none", "--lambda", "0.3"], "--lambda sets the fixed policy's λ"),
        (
            ["--reliance-arg", "nope=1"],
            "bad parameters for reliance 'fixed': nope: Extra inputs are not permitted",
        ),
    ],
)
def test_cli_errors_are_one_sentence_and_exit_2(tmp_path, args, message):
    result = run_kd("run", *args, "--print-config", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
