"""Students cut from the teacher: a subset of its decoder layers, with its embeddings, final norm and head.

Depth pruning in the manner of DistilBERT (every other layer) and Minitron (drop whole layers):
the student has the teacher's architecture and width, and starts from the teacher's weights
instead of a random init. Specs, as a user writes them for ``--student``:

- ``from-teacher:layers=0,10,20,29``: exactly these layers, in increasing order;
- ``from-teacher:every=3``: layers 0, 3, 6, ... (the last one only when it falls on the grid);
- ``from-teacher:num_layers=4``: ``n`` layers evenly spaced from the first to the last,
  layer ``i`` of the student being teacher layer ``floor(i·(L − 1)/(n − 1) + 0.5)`` (``n = 1``: layer 0).

Supported layouts: Llama-style ``model.layers`` (Llama, Qwen2, Mistral, Gemma, Phi-3, ...) and
GPT-2-style ``transformer.h``. The student is a fresh model built from the teacher's config with
``num_hidden_layers`` changed (per-layer config lists such as ``layer_types`` cut alike), and every
tensor copied: the chosen layers renumbered ``0..n-1``, everything outside the layers as is. Tied
embeddings stay tied; the result is an ordinary model that saves with ``save_pretrained``.

A run then calibrates the cut's head on its first training samples (:func:`calibrate_head`): the copied
head reads the last kept layer's output as if it were the teacher's last layer's, and a heavy cut is
confidently wrong until its final norm is scaled down.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdcore.errors import KdError

__all__ = [
    "PREFIX",
    "CutSpec",
    "calibrate_head",
    "cut_config",
    "cut_student",
    "decoder_layout",
    "parse_cut_spec",
]

PREFIX = "from-teacher"
KEYS = ("layers", "every", "num_layers")
_FORMS = "from-teacher:layers=0,10,20,29, from-teacher:every=3 or from-teacher:num_layers=4"
#: Config attributes that hold one entry per decoder layer.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
#: Where the decoder layers live: module path → layer prefix in the state dict.
LAYOUTS = (("model.layers", "model.layers."), ("transformer.h", "transformer.h."))
#: The final norm before the head, per layout (by its layers' state-dict prefix).
FINAL_NORMS = {"model.layers.": "model.norm", "transformer.h.": "transformer.ln_f"}
#: The scales :func:`calibrate_head` tries: 1 (as copied) down to 1/256, in quarter octaves.
SCALES = tuple(2 ** (-k / 4) for k in range(33))
#: The most tokens :func:`calibrate_head` scores (their logits are held at once).
CALIBRATION_TOKENS = 1024


@dataclass(frozen=True)
class CutSpec:
    """One of ``layers``, ``every`` or ``num_layers``, as parsed; resolved against a teacher by :meth:`select`."""

    key: str
    layers: tuple[int, ...] = ()
    value: int = 0
    source: str = ""

    def select(self, total: int) -> list[int]:
        """The teacher's layer indices to keep, for a teacher of ``total`` layers."""
        where = f"student '{self.source}'"
        if self.key == "layers":
            for i in self.layers:
                if not 0 <= i < total:
                    raise KdError(
                        f"{where}: layer {i} is out of range; the teacher has {total} layers, numbered 0 to {total - 1}"
                    )
            seen = set()
            for i in self.layers:
                if i in seen:
                    raise KdError(f"{where}: layer {i} is listed twice; list each layer once")
                seen.add(i)
            if list(self.layers) != sorted(self.layers):
                raise KdError(f"{where}: list the layers in increasing order, e.g. {sorted(self.layers)}")
            return list(self.layers)
        if self.key == "every":
            if not 1 <= self.value <= total:
                raise KdError(f"{where}: every must be between 1 and the teacher's {total} layers")
            return list(range(0, total, self.value))
        if not 1 <= self.value <= total:
            raise KdError(f"{where}: num_layers must be between 1 and the teacher's {total} layers")
        if self.value == 1:
            return [0]
        n = self.value - 1  # round(i·(L − 1)/n) in integers, halves up: no float ties
        return [(2 * i * (total - 1) + n) // (2 * n) for i in range(self.value)]


def parse_cut_spec(source: str) -> CutSpec | None:
    """``from-teacher:key=value`` → CutSpec; anything else → None."""
    text = source.strip()
    if text != PREFIX and not text.startswith(PREFIX + ":"):
        return None
    rest = text[len(PREFIX) + 1 :].strip()
    key, sep, raw = rest.partition("=")
    key = key.strip()
    if not sep or not raw.strip():
        raise KdError(f"student '{source}' needs one key=value; write {_FORMS}")
    if key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise KdError(f"student '{source}': unknown key '{key}'; {hint}write {_FORMS}")
    values = [v.strip() for v in raw.split(",")]
    if (key != "layers" and len(values) > 1) or "=" in raw:
        raise KdError(f"student '{source}' takes one key; write {_FORMS}")
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise KdError(f"student '{source}': {key} takes whole numbers; write {_FORMS}") from None
    if key == "layers":
        return CutSpec("layers", layers=numbers, source=source)
    return CutSpec(key, value=numbers[0], source=source)


def decoder_layout(model: Any) -> tuple[str, Any]:
    """``(state-dict prefix, layer list)`` of ``model``'s decoder layers; one sentence when unknown."""
    for path, prefix in LAYOUTS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if module is not None and hasattr(module, "__len__"):
            return prefix, module
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise KdError(
        f"cannot cut a student from a '{kind}' teacher: kdcore finds decoder layers at model.layers "
        "(Llama, Qwen2, Mistral, ...) or transformer.h (GPT-2); pass a student model or a spec instead"
    )


def cut_config(teacher_config: Any, chosen: Sequence[int]) -> Any:
    """The student's config: the teacher's with ``len(chosen)`` layers (per-layer lists cut alike).

    Needs no weights, so a dry run can size the student from the teacher's config alone.
    """
    config = copy.deepcopy(teacher_config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded teacher; the student is a plain model
        del config.quantization_config
    total = teacher_config.num_hidden_layers
    for name in PER_LAYER_CONFIG:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, name, type(value)(value[i] for i in chosen))
    config.num_hidden_layers = len(chosen)
    return config


def cut_student(teacher: Any, spec: CutSpec | Sequence[int]) -> Any:
    """A student of the teacher's class holding the chosen layers; the teacher is left untouched.

    ``spec`` is a :class:`CutSpec` or the layer indices themselves. The student is in training mode
    on the teacher's device and dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    prefix, layers = decoder_layout(teacher)
    total = len(layers)
    if total != teacher.config.num_hidden_layers:
        raise KdError(
            f"the teacher has {total} decoder layers but its config says {teacher.config.num_hidden_layers}; "
            "cannot cut a student from it"
        )
    chosen = spec.select(total) if isinstance(spec, CutSpec) else CutSpec("layers", tuple(spec)).select(total)
    renumber = {old: new for new, old in enumerate(chosen)}
    source = teacher.state_dict()
    state = {}
    for key, tensor in source.items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        if int(index) in renumber:
            state[f"{prefix}{renumber[int(index)]}.{rest}"] = tensor
    dtype = next(teacher.parameters()).dtype
    device = next(teacher.parameters()).device
    student = AutoModelForCausalLM.from_config(cut_config(teacher.config, chosen), dtype=dtype).to(device)
    with torch.no_grad():
        missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads are absent from some state dicts; anything else missing is a layout kdcore does not know.
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise KdError(
            f"cannot cut a student from this '{teacher.config.model_type}' teacher: its weights do not map "
            f"onto a {len(chosen)}-layer model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    student.train()
    return student


def calibrate_head(student: Any, input_ids: Any, attention_mask: Any, labels: Any = None) -> float:
    """Scale a cut student's final norm by the factor in :data:`SCALES` (at most 1) that gives the lowest
    cross-entropy on these samples (their first :data:`CALIBRATION_TOKENS` tokens); returns the factor.

    Why: the copied head reads the last kept layer's residual stream as if it came out of the teacher's
    last layer. It does not (SmolLM2's middle layers write outliers that its last layer removes), and the
    logits are confident and wrong: a 4-layer cut of SmolLM2-135M starts at a perplexity of millions,
    where a random init is near the vocabulary size. Scaling the final norm scales the logits (the head
    is linear, without bias; tied embeddings stay untouched), a temperature that makes the cut no more
    confident than the data supports. ``labels``: a chat sample's unshifted targets, as packing gives them.
    """
    import torch
    import torch.nn.functional as F

    from kdcore.inputs.packing import IGNORE_INDEX, shift_labels

    prefix, _ = decoder_layout(student)
    norm = student.get_submodule(FINAL_NORMS[prefix])
    rows = max(1, CALIBRATION_TOKENS // max(1, input_ids.shape[1]))
    ids, mask = input_ids[:rows], attention_mask[:rows]
    targets = shift_labels(ids, mask, None if labels is None else labels[:rows]).flatten()
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        return 1.0
    device = next(student.parameters()).device
    training = student.training
    student.eval()
    with torch.no_grad():
        logits = student(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits, targets = logits.flatten(0, 1)[keep.to(device)].float(), targets[keep].to(device)
        losses = [float(F.cross_entropy(scale * logits, targets)) for scale in SCALES]
        best = SCALES[min(range(len(SCALES)), key=losses.__getitem__)]
        if best != 1.0:
            for parameter in norm.parameters(recurse=False):  # the weight, and a LayerNorm's bias
                parameter.mul_(best)
    student.train(training)
    return best
