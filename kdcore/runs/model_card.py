"""The student's model card (``student/README.md``) in the Hugging Face format, and ``--push-to-hub``.

The card is YAML front matter (``library_name: transformers``, ``tags``, ``base_model`` and
``teacher`` when they are hub ids, ``datasets`` when the data is a hub dataset, a ``model-index``
with the student's eval perplexity) followed by Markdown: the strategy and its parameters, the training
set-up, the eval perplexity of the teacher, of the CE baseline when known, and of the student, and
how to load and reproduce it. :func:`kdcore.runs.runner.run` writes it right after saving the student;
:func:`refresh_model_card` rewrites it from a finished run directory, e.g. once ``kd compare`` knows
the CE baseline's perplexity.

``kd run --push-to-hub user/name`` (``output.push_to_hub``) uploads ``student/`` after the run with
``HfApi().create_repo(exist_ok=True)`` and ``upload_folder``: log in first (``hf auth login`` or
``HF_TOKEN``). A failed upload leaves the finished run in place; ``hf upload user/name RUN_DIR/student``
retries it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Any

import yaml

from kdcore import __version__
from kdcore.errors import KdError
from kdcore.files import atomic_write_text
from kdcore.formats import significant
from kdcore.inputs.cut import parse_cut_spec
from kdcore.inputs.models import parse_spec
from kdcore.strategies import KINDS
from kdcore.summary import RunSummary

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def hub_model_id(source: str | None) -> str | None:
    """``source`` when it names a model on the hub (not a spec, not a local path), else None."""
    if not source or Path(source).exists() or source.startswith((".", "/", "~")):
        return None
    if ":" in source:  # a from-scratch spec such as gpt2:n_layer=2
        return None
    return source if _HUB_ID.match(source) else None


def hub_dataset_id(source: str | None) -> str | None:
    """The dataset name when ``source`` is a hub dataset (``name[:config[:split]]``), else None."""
    if not source or source == "demo" or Path(source).exists() or source.endswith(_DATA_SUFFIXES):
        return None
    name = source.split(":")[0]
    return name if _HUB_ID.match(name) else None


def _tags(strategy: Mapping[str, str]) -> list[str]:
    tags = ["knowledge-distillation", "kdcore", "text-generation"]
    if strategy.get("scorer", "none") != "none" or strategy.get("pacing", "none") != "none":
        tags.append("curriculum-learning")
    if strategy.get("reliance") not in ("fixed", "none", None):
        tags.append("selective-reliance")
    tags += [f"kdcore-{kind}-{strategy[kind]}" for kind in KINDS if kind in strategy]
    return tags


def render_model_card(
    config: Mapping[str, Any],
    strategies: Mapping[str, Mapping[str, Any]],
    summary: RunSummary,
    *,
    ce_baseline_eval_ppl: float | None = None,
    model_name: str | None = None,
) -> str:
    """The card's text.

    ``config`` is the resolved config as a mapping (``RunConfig.to_dict()``), ``strategies`` the
    run's strategy metadata (``strategies.yaml``: kind -> name, params, distribution), ``summary``
    the run's numbers (the teacher's and the student's eval perplexity at least) and
    ``ce_baseline_eval_ppl`` the CE-only student's, when a comparison measured it.
    """
    model, data, strategy = (config.get(k, {}) for k in ("model", "data", "strategy"))
    output = config.get("output", {})
    teacher = model.get("teacher")
    names = {kind: strategies[kind]["name"] for kind in KINDS if kind in strategies}
    model_name = model_name or output.get("push_to_hub") or "kdcore-student"
    dataset_label = data.get("eval_dataset") or data.get("dataset") or "demo"
    front = _front_matter(_meta(config, names), model_name, str(dataset_label), summary.student_eval_ppl)
    evals = [
        ("teacher", summary.teacher_eval_ppl),
        ("CE baseline (same student, labels only)", ce_baseline_eval_ppl),
        ("student before distillation", summary.student_initial_eval_ppl),
        (f"**student ({model_name})**", summary.student_eval_ppl),
    ]
    load_from = output.get("push_to_hub") or "path/to/student"
    body = _BODY.substitute(
        model_name=model_name,
        teacher=teacher,
        strategy_rows="\n".join(
            f"| {kind} | `{names[kind]}` | {_params(strategies[kind].get('params'))} | "
            f"{strategies[kind].get('distribution', '')} |"
            for kind in KINDS
            if kind in strategies
        ),
        temperature=strategy.get("temperature"),
        order="hard to easy (anti-curriculum)" if strategy.get("reverse") else "easy to hard",
        setup_rows="\n".join(f"| {name} | {value} |" for name, value in _setup(config, summary)),
        dataset_label=dataset_label,
        eval_rows="\n".join(f"| {name} | {significant(value, 4)} |" for name, value in evals),
        baseline_note=""
        if ce_baseline_eval_ppl is not None
        else "\nThe CE baseline is not known for a single run; `kd compare` measures it.\n",
        load_from=load_from,
        config=yaml.safe_dump(dict(config), sort_keys=False).rstrip(),
    )
    return front + body


def _meta(config: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The front matter's fields besides the results: library, tags, hub ids of models and data."""
    model, data = config.get("model", {}), config.get("data", {})
    teacher, student = model.get("teacher"), model.get("student")
    base = [m for m in (hub_model_id(student), hub_model_id(teacher)) if m]
    datasets = [
        d for d in (hub_dataset_id(data.get("dataset")), hub_dataset_id(data.get("eval_dataset"))) if d
    ]
    return {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": _tags(names),
        "base_model": base[0] if base else None,
        "teacher": hub_model_id(teacher),
        "datasets": list(dict.fromkeys(datasets)) or None,
    }


def _setup(config: Mapping[str, Any], summary: RunSummary) -> list[tuple[str, Any]]:
    """The card's training set-up table: models, data, optimisation, seed, kdcore version."""
    model, data, training = (config.get(k, {}) for k in ("model", "data", "training"))
    teacher, student = model.get("teacher"), model.get("student")
    if parse_cut_spec(str(student)) is not None:
        student = (
            f"`{student}`: decoder layers, embeddings, final norm and head copied from the teacher "
            "(the final norm scaled down when the copied head was overconfident)"
        )
    else:
        student = f"`{student}`"
    return [
        ("teacher", f"`{teacher}`"),
        ("student", student),
        (
            "tokenizer",
            f"`{model.get('tokenizer') or ('byte' if parse_spec(str(teacher)) else 'the teacher’s')}`",
        ),
        ("training data", f"`{data.get('dataset')}`"),
        ("eval data", f"`{data.get('eval_dataset') or 'held out from the training data'}`"),
        ("sequence length", data.get("seq_len")),
        ("optimizer steps", summary.steps or training.get("max_steps")),
        ("batch size × grad accumulation", f"{training.get('batch_size')} × {training.get('grad_accum', 1)}"),
        ("peak learning rate (AdamW, warm-up + cosine)", training.get("lr")),
        ("weight decay", training.get("weight_decay")),
        ("mixed precision", training.get("mixed_precision")),
        ("training tokens", significant(summary.train_tokens, 4)),
        ("seed", training.get("seed")),
        ("kdcore version", __version__),
    ]


#: The card's Markdown below the front matter (string.Template).
_BODY = Template(
    """
# $model_name

A causal language model distilled with [kdcore](https://pypi.org/project/kdcore/) from the teacher
`$teacher`. Each sample's loss is `(1-λ)·CE(y, P_S) + λ·τ²·D(P_T ‖ P_S)`: the difficulty scorer and
pacing function decide which samples the student sees when (curriculum), the reliance policy how much
each one leans on the teacher (λ).

## Strategy

| kind | name | parameters | package |
| --- | --- | --- | --- |
$strategy_rows

Temperature τ = $temperature; curriculum order: $order.

## Training set-up

| setting | value |
| --- | --- |
$setup_rows

## Evaluation

Perplexity on the eval data (`$dataset_label`), lower is better.

| model | eval perplexity |
| --- | --- |
$eval_rows
$baseline_note
## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("$load_from")
model = AutoModelForCausalLM.from_pretrained("$load_from")
```

## Reproduce

`pip install kdcore`, save the config below as `config.yaml`, then `kd run --config config.yaml`.

```yaml
$config
```
"""
)


def _params(params: Mapping[str, Any] | None) -> str:
    if not params:
        return "—"
    return ", ".join(f"`{key}={value}`" for key, value in params.items())


def _front_matter(meta: dict[str, Any], model_name: str, dataset: str, student_eval_ppl: float | None) -> str:
    """YAML front matter; its model-index holds this model's own result (the teacher and the CE
    baseline are in the body)."""
    meta = {key: value for key, value in meta.items() if value is not None}
    results = [("eval perplexity", student_eval_ppl)] if student_eval_ppl is not None else []
    try:
        from huggingface_hub import EvalResult, ModelCardData
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type="perplexity",
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in results
    ]
    data = ModelCardData(model_name=model_name, eval_results=eval_results or None, **meta)
    return f"---\n{data.to_yaml()}\n---\n"


def write_model_card(directory: Path, text: str) -> Path:
    """Write the card ``text`` (:func:`render_model_card`) as ``directory/README.md``."""
    try:
        from huggingface_hub import ModelCard

        text = str(ModelCard(text))  # validates the front matter
    except ImportError:  # pragma: no cover
        pass
    path = Path(directory) / CARD
    atomic_write_text(path, text)
    return path


def refresh_model_card(run_dir: Path, *, ce_baseline_eval_ppl: float | None = None) -> Path:
    """Rewrite ``run_dir/student/README.md`` from the finished run's files, e.g. with the CE baseline."""
    run_dir = Path(run_dir)
    summary = RunSummary.read(run_dir)
    if not (run_dir / "student").is_dir() or summary is None:
        raise KdError(f"'{run_dir}' holds no finished run with a saved student")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    strategies = yaml.safe_load((run_dir / "strategies.yaml").read_text())
    card = render_model_card(config, strategies, summary, ce_baseline_eval_ppl=ce_baseline_eval_ppl)
    return write_model_card(run_dir / "student", card)


def check_push(repo_id: str | None, save_student: bool) -> None:
    """Fail before training when ``--push-to-hub`` cannot work."""
    if not repo_id:
        return
    if not save_student:
        raise KdError("--push-to-hub uploads the saved student; set output.save_student to true")
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise KdError(f"--push-to-hub '{repo_id}' is not a hub repo id; use user/name") from None
    if constants.HF_HUB_OFFLINE:
        raise KdError(
            "--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it, "
            "or upload later with hf upload REPO RUN_DIR/student"
        )


def push_to_hub(folder: Path, repo_id: str, *, private: bool | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload a student distilled with kdcore",
        )
    except Exception as exc:  # network, auth, permissions: the run itself is fine
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KdError(
            f"could not push '{folder}' to the hub repo '{repo_id}' ({first[:200]}); the run is saved, "
            f"log in (hf auth login) and retry with hf upload {repo_id} {folder}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
