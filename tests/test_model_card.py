"""The student's model card (Hugging Face format) and the --push-to-hub checks (no network, nothing mocked)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import tiny_overrides

from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.runs.model_card import (
    check_push,
    hub_dataset_id,
    hub_model_id,
    refresh_model_card,
    render_model_card,
)
from kdcore.runs.runner import run
from kdcore.summary import RunSummary


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def eval_rows(text: str) -> dict[str, str]:
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", section, re.M)
    return {name: value for name, value in rows if name not in ("model", "---")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    overrides = tiny_overrides(
        tmp_path_factory.mktemp("card") / "run",
        **{"strategy.scorer.name": "teacher-confidence", "strategy.pacing.name": "linear"},
    )
    overrides["strategy.reliance.name"] = "threshold"
    return run(resolve_config(None, overrides), show_progress=False)


def test_a_run_writes_a_model_card_beside_the_student(finished):
    card = (finished.run_dir / "student" / "README.md").read_text()
    meta = front_matter(card)
    summary = finished.summary
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    for tag in (
        "knowledge-distillation",
        "kdcore",
        "curriculum-learning",
        "selective-reliance",
        "kdcore-scorer-teacher-confidence",
        "kdcore-pacing-linear",
        "kdcore-reliance-threshold",
    ):
        assert tag in meta["tags"], tag
    # spec models and the demo corpus are not on the hub: no base_model, teacher or datasets
    assert "base_model" not in meta and "teacher" not in meta and "datasets" not in meta
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0]["type"] == "perplexity"
    assert result["metrics"][0]["value"] == pytest.approx(summary["student_eval_ppl"])
    rows = eval_rows(card)
    assert float(rows["teacher"]) == pytest.approx(summary["teacher_eval_ppl"], rel=1e-3)
    assert rows["CE baseline (same student, labels only)"] == "—"
    assert float(rows["student before distillation"]) == pytest.approx(
        summary["student_initial_eval_ppl"], rel=1e-3
    )
    assert float(rows["**student (kdcore-student)**"]) == pytest.approx(summary["student_eval_ppl"], rel=1e-3)
    # the strategy with its parameters, and the config that reproduces the run
    strategies = yaml.safe_load((finished.run_dir / "strategies.yaml").read_text())
    for kind, meta_ in strategies.items():
        assert f"| {kind} | `{meta_['name']}` |" in card
    for key, value in strategies["reliance"]["params"].items():
        assert f"`{key}={value}`" in card
    config_block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(config_block) == yaml.safe_load((finished.run_dir / "config.yaml").read_text())


def test_the_card_loads_with_huggingface_hub(finished):
    from huggingface_hub import ModelCard

    card = ModelCard.load(finished.run_dir / "student" / "README.md")
    assert card.data.library_name == "transformers"
    assert "knowledge-distillation" in card.data.tags


def test_refresh_fills_the_ce_baseline(finished, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished.run_dir, copy)
    refresh_model_card(copy, ce_baseline_eval_ppl=123.456)
    card = (copy / "student" / "README.md").read_text()
    assert eval_rows(card)["CE baseline (same student, labels only)"] == "123.5"
    assert "not known for a single run" not in card
    summary = json.loads((copy / "summary.json").read_text())
    assert front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(
        summary["student_eval_ppl"]
    )


def test_hub_ids_become_base_model_teacher_and_datasets(tmp_path):
    config = resolve_config(
        None,
        {
            "model.teacher": "gpt2",
            "model.student": "distilbert/distilgpt2",
            "data.dataset": "wikitext:wikitext-2-raw-v1:train",
            "output.push_to_hub": "me/kd-student",
        },
    ).to_dict()
    strategies = {
        "scorer": {"name": "none", "params": {}, "distribution": "kdcore"},
        "reliance": {"name": "fixed", "params": {"value": 0.5}, "distribution": "kdcore"},
    }
    summary = RunSummary(teacher_eval_ppl=30.0, student_eval_ppl=40.0)
    card = render_model_card(config, strategies, summary, ce_baseline_eval_ppl=50.0)
    meta = front_matter(card)
    assert meta["base_model"] == "distilbert/distilgpt2"
    assert meta["teacher"] == "gpt2"
    assert meta["datasets"] == ["wikitext"]
    assert meta["model-index"][0]["name"] == "me/kd-student"
    assert "curriculum-learning" not in meta["tags"] and "selective-reliance" not in meta["tags"]
    assert eval_rows(card)["CE baseline (same student, labels only)"] == "50"
    assert 'from_pretrained("me/kd-student")' in card


def test_local_paths_and_specs_are_not_hub_ids(tmp_path):
    assert hub_model_id("gpt2:n_layer=2") is None
    assert hub_model_id(str(tmp_path)) is None
    assert hub_model_id("./model") is None
    assert hub_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_dataset_id("demo") is None
    assert hub_dataset_id("data/train.jsonl") is None
    assert hub_dataset_id("roneneldan/TinyStories") == "roneneldan/TinyStories"


def test_push_to_hub_is_checked_before_training(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdError, match="HF_HUB_OFFLINE"):
        check_push("me/kd-student", save_student=True)
    with pytest.raises(KdError, match="save_student"):
        check_push("me/kd-student", save_student=False)
    with pytest.raises(KdError, match="not a hub repo id"):
        check_push("not a repo", save_student=True)
    check_push(None, save_student=False)  # not asked: nothing to check
