"""One teacher for every arm: resolved once (a spec teacher is trained with the teacher seed), optionally
cached once for all arms, and described (parameter counts) for the table's header."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from kdcore.compare.plan import Plan
from kdcore.config import RunConfig


def resolve_plan_teacher(plan: Plan, console: Console, info: dict[str, Any]) -> str:
    """The teacher as a directory (or hub id), recorded in ``plan.teacher_dir``; the training time goes
    into ``info["resolve_seconds"]``."""
    if plan.teacher_dir and Path(plan.teacher_dir).is_dir():
        return plan.teacher_dir
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import parse_spec, quiet_transformers
    from kdcore.teachers.resolve import resolve_teacher

    quiet_transformers()
    cfg = RunConfig.model_validate(plan.base)
    source = cfg.model.teacher
    if parse_spec(source) is None:
        plan.teacher_dir = source
        return source
    import torch

    threads = cfg.training.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    training = cfg.training.model_copy(update={"seed": plan.teacher_seed})
    corpus = load_corpus(cfg.data, plan.teacher_seed)
    start = time.perf_counter()
    directory, _ = resolve_teacher(cfg.model, corpus, cfg.data.seq_len, training, console)
    info["resolve_seconds"] = time.perf_counter() - start
    plan.teacher_dir = directory
    return directory


def prepare_teacher_cache(
    plan: Plan, out_dir: Path, console: Console, log: Callable[[str], None], info: dict[str, Any]
) -> str | None:
    """One teacher cache for every arm: an existing directory, or built once in ``out_dir``."""
    option = plan.teacher_cache
    if option is None:
        return None
    if option != "auto":
        return option
    directory = out_dir / "teacher-cache"
    if (directory / "manifest.json").is_file():
        log(f"teacher cache: {directory} (built before)")
        return str(directory.resolve())
    from kdcore.teachers.cache import build_cache

    cfg = RunConfig.model_validate(plan.base)
    k = plan.teacher_cache_k
    if k is None:
        from kdcore.inputs.models import load_tokenizer

        vocab = len(load_tokenizer(plan.teacher_dir))
        k = vocab if vocab <= 512 else 64
    model = cfg.model.model_copy(update={"teacher": plan.teacher_dir, "tokenizer": None})
    training = cfg.training.model_copy(
        update={"seed": plan.teacher_seed, "threads": cfg.training.threads or (os.cpu_count() or 1)}
    )
    cache_cfg = cfg.model_copy(update={"model": model, "training": training})
    start = time.perf_counter()
    manifest = build_cache(cache_cfg, directory, top_k=int(k), console=console)
    info["cache_seconds"] = time.perf_counter() - start
    info["cache_top_k"] = manifest.get("top_k")
    log(f"teacher cache: {directory} (top-{manifest.get('top_k')})")
    return str(directory.resolve())


def describe_models(plan: Plan) -> dict[str, Any]:
    """Parameter counts of the teacher and the student, and how the teacher was trained (informative only)."""
    info: dict[str, Any] = {}
    try:
        from kdcore.inputs.models import build_from_spec, load_pretrained, load_tokenizer, parse_spec

        cfg = RunConfig.model_validate(plan.base)
        teacher = load_pretrained(plan.teacher_dir or cfg.model.teacher)
        info["params"] = sum(p.numel() for p in teacher.parameters())
        spec = parse_spec(cfg.model.student)
        if spec is not None:
            tokenizer = load_tokenizer(plan.teacher_dir)
            student = build_from_spec(spec, tokenizer, 0)
        else:
            student = load_pretrained(cfg.model.student)
        info["student_params"] = sum(p.numel() for p in student.parameters())
        training = Path(plan.teacher_dir or "") / "kdcore_teacher.json"
        if training.is_file():
            info["training"] = json.loads(training.read_text())
    except Exception as exc:  # counts are informative only
        info["params_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return info
