"""Chat and instruction data: one sample per conversation, labels only on what the assistant says.

Rows (one JSON object per line of a ``.jsonl`` file) take one of two forms:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, rendered with
  the tokenizer's chat template; the tokens of every assistant turn are targets;
- ``{"prompt": "...", "completion": "..."}``, plain text: the prompt tokenised as the tokenizer
  tokenises a text (BOS if it adds one), then the completion and EOS, which are the targets.

Which tokens belong to an assistant turn. A template with ``{% generation %}`` markers says so
itself (transformers' ``return_assistant_tokens_mask``). Most templates, SmolLM2's among them,
have none; then turn ``j`` is located by rendering the conversation up to turn ``j`` with the
generation prompt (``…<|im_start|>assistant\\n``) and through turn ``j``: the tokens between the
two are the turn, its end-of-turn marker included (what teaches the model to stop). That holds only
if each rendering's tokens extend the previous one's — checked for every turn, and a conversation
whose template breaks it (a template that rewrites earlier turns, such as one dropping past
reasoning) is refused with one sentence. Control tokens inside message text (a literal
``<|im_end|>``) are encoded as text when transformers supports it (``sanitize_control_tokens``).

Samples: right-padded to ``seq_len``; a longer conversation is truncated to its first ``seq_len``
tokens (the system prompt and the first turns are kept, later turns are cut). A conversation left
with no target token to predict is dropped and reported. A message too long to fit is cut to the characters
that can reach ``seq_len`` tokens before it is rendered (:func:`_bounded`), so one huge row costs no more
memory than a row of ``seq_len`` tokens. Sample ``i`` is the ``i``-th kept row, so
ids are stable for the same file, tokenizer and ``seq_len``; ``rows`` maps them back to file lines.

``labels`` follow the Hugging Face convention: the token id where the token is a target, ``-100``
elsewhere, *not* shifted (position ``t`` of the logits predicts ``labels[t + 1]``).

As a run's data (:class:`ChatCorpus`, chosen by :func:`kdcore.inputs.corpus.load_corpus` for a
``.jsonl`` file whose first row is a conversation or a prompt/completion pair): the eval split is
the last ``data.eval_fraction`` of the rows (or ``data.eval_dataset``), and each split becomes a
:class:`~kdcore.inputs.packing.PackedDataset` with these labels and ``prompt_lengths``, the tokens
before a sample's first target.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import KdError
from kdcore.inputs.packing import IGNORE_INDEX, PackedDataset
from kdcore.inputs.tokenization import longest_token

__all__ = [
    "ROLES",
    "ChatCorpus",
    "ChatSamples",
    "encode_chat",
    "encode_conversation",
    "is_chat_row",
    "load_chat_corpus",
    "load_chat_jsonl",
    "read_jsonl",
]

ROLES = ("system", "user", "assistant")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class ChatSamples:
    """One sample per kept conversation: ``[N, seq_len]`` tensors and where each row came from."""

    input_ids: torch.Tensor  # long, right-padded
    attention_mask: torch.Tensor  # long, 1 = real token
    labels: torch.Tensor  # long, the token where it is a target, -100 elsewhere (unshifted)
    rows: list[int]  # the file line (1-based) of each sample
    truncated: list[int] = field(default_factory=list)  # lines cut at seq_len (and kept)
    dropped: list[int] = field(default_factory=list)  # lines with no target token within seq_len

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-blank line; one sentence for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"chat data '{path}' does not exist; pass a .jsonl file with one conversation per line")
    from kdcore.inputs.corpus import not_utf8

    records = []
    with path.open("rb") as handle:  # bytes, decoded line by line: a bad byte is named with its line
        for number, raw in enumerate(handle, start=1):
            try:  # utf-8-sig: a byte-order mark is not part of the first row
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(f"line {number} of '{path}'", exc) from None
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise KdError(
                    f"line {number} of '{path}' is not valid JSON ({exc.msg}); write one JSON object per line"
                ) from None
    if not records:
        raise KdError(f"chat data '{path}' holds no rows; write one JSON object per line")
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise KdError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message:
            raise KdError(
                f"{where}: message {k} has no 'role'; give every message a role ({', '.join(ROLES)})"
            )
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise KdError(f"{where}: message {k} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise KdError(f"{where}: message {k} ({role}) has no text 'content'; give it a string")
        if not content.strip():
            raise KdError(
                f"{where}: message {k} ({role}) has empty content; give it text or remove the message"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise KdError(
            f"{where}: no assistant message, so nothing in it would be trained on; add the reply or drop the row"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _bounded(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The conversation up to the first message longer than ``limit`` characters, that one cut to
    ``limit``: its first ``limit`` characters already hold more than ``seq_len`` tokens, so the sample is
    the same and one huge row costs what a row of ``seq_len`` tokens does."""
    for j, message in enumerate(messages):
        if len(message["content"]) > limit:
            return [*messages[:j], {"role": message["role"], "content": message["content"][:limit]}]
    return messages


def _sanitize_kwargs(tokenizer: Any) -> dict[str, bool]:
    params = inspect.signature(tokenizer.apply_chat_template).parameters
    return {"sanitize_control_tokens": True} if "sanitize_control_tokens" in params else {}


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
        **_sanitize_kwargs(tokenizer),
    )
    return list(ids)


def encode_conversation(
    messages: list[dict[str, str]], tokenizer: Any, where: str = "conversation"
) -> tuple[list[int], list[bool]]:
    """Token ids of one rendered conversation and, per token, whether it belongs to an assistant turn."""
    try:
        if _GENERATION_MARKER.search(tokenizer.chat_template):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        full = _render(tokenizer, messages, generation_prompt=False)
        mask = [False] * len(full)
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:j], generation_prompt=True)
            through = _render(tokenizer, messages[: j + 1], generation_prompt=False)
            if through[: len(before)] != before or full[: len(through)] != through:
                raise KdError(
                    f"{where}: the chat template does not render message {j + 1} (assistant) as an extension "
                    "of the conversation before it, so its tokens cannot be located; use a template with "
                    "{% generation %} markers or one that renders each turn independently"
                )
            mask[len(before) : len(through)] = [True] * (len(through) - len(before))
    except KdError:
        raise
    except Exception as exc:  # jinja's TemplateError, a template's own raise_exception(...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise KdError(
            f"{where}: the chat template failed on it ({first}); fix the row or the template"
        ) from None
    return full, mask


def _encode_prompt_completion(record: dict, tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value.strip():
            raise KdError(f"{where}: '{name}' must be non-empty text")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return [*prompt_ids, *completion_ids], [False] * len(prompt_ids) + [True] * len(completion_ids)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_chat(
    records: Sequence[tuple[int, Any]], tokenizer: Any, seq_len: int, source: str = "chat data"
) -> ChatSamples:
    """``(line number, row)`` pairs → padded samples with assistant-only labels (module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    pad = _pad_id(tokenizer)
    limit = (seq_len + 1) * longest_token(tokenizer)  # characters that cover more than seq_len tokens
    ids_rows, label_rows, kept, truncated, dropped = [], [], [], [], []
    for number, record in records:
        where = f"line {number} of {source}"
        if not isinstance(record, dict):
            raise KdError(
                f"{where} is not a JSON object; write {{'messages': [...]}} or {{'prompt', 'completion'}}"
            )
        if "messages" in record:
            if not getattr(tokenizer, "chat_template", None):
                raise KdError(
                    f"the tokenizer has no chat template, so the messages of {where} cannot be rendered; use "
                    "the tokenizer of an instruction-tuned model or prompt/completion rows"
                )
            messages = _bounded(_check_messages(record["messages"], where), limit)
            if not any(m["role"] == "assistant" for m in messages):  # a prompt longer than seq_len
                dropped.append(number)
                continue
            ids, mask = encode_conversation(messages, tokenizer, where)
        elif "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            if isinstance(prompt, str) and len(prompt) > limit:  # no completion token within seq_len
                dropped.append(number)
                continue
            if isinstance(completion, str) and len(completion) > limit:
                record = {**record, "completion": completion[:limit]}
            ids, mask = _encode_prompt_completion(record, tokenizer, where)
        else:
            raise KdError(
                f"{where} has neither 'messages' nor 'prompt' and 'completion'; write one of these forms"
            )
        if len(ids) > seq_len:
            truncated.append(number)
            ids, mask = ids[:seq_len], mask[:seq_len]
        if not any(mask[1:]):  # position 0 is never predicted
            dropped.append(number)
            continue
        ids_rows.append(ids)
        label_rows.append(
            [token if target else IGNORE_INDEX for token, target in zip(ids, mask, strict=True)]
        )
        kept.append(number)
    if not kept:
        raise KdError(
            f"no row of {source} keeps an assistant token within seq_len={seq_len}; raise data.seq_len"
        )
    input_ids = torch.full((len(kept), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), seq_len), dtype=torch.long)
    labels = torch.full((len(kept), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    kept_rows = set(kept)
    return ChatSamples(
        input_ids, attention_mask, labels, kept, [n for n in truncated if n in kept_rows], dropped
    )


def load_chat_jsonl(path: str | Path, tokenizer: Any, seq_len: int) -> ChatSamples:
    """:func:`encode_chat` over the rows of a ``.jsonl`` file."""
    return encode_chat(read_jsonl(path), tokenizer, seq_len, source=f"'{path}'")


def is_chat_row(record: Any) -> bool:
    """A conversation (``messages``) or an instruction pair (``prompt`` and ``completion``)."""
    return isinstance(record, dict) and ("messages" in record or {"prompt", "completion"} <= record.keys())


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 5 else ''}"


def _row_text(record: Any) -> str:
    if not isinstance(record, dict):
        return ""
    if isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    return f"{record.get('prompt', '')}\n{record.get('completion', '')}"


@dataclass
class ChatCorpus:
    """Chat or instruction rows, split into train and eval by rows, before tokenisation.

    Has what a run asks of a corpus: ``train_texts`` (the rows' text, for a BPE tokenizer trained on the
    data), ``fingerprint`` and :meth:`pack`.
    """

    train_rows: list[tuple[int, Any]]  # (line number, row)
    eval_rows: list[tuple[int, Any]]
    train_source: str
    eval_source: str
    max_eval_samples: int | None = None

    @property
    def train_texts(self) -> list[str]:
        return [text for _, row in self.train_rows if (text := _row_text(row))]

    def share(self, share: float) -> ChatCorpus:
        """Every row: a share of the training text (``data.train_share``) is for plain text only."""
        if share < 1:
            raise KdError(
                f"data.train_share {share} keeps a share of plain text, and {self.train_source} holds chat "
                "rows; keep the rows you want in the .jsonl and leave data.train_share at 1"
            )
        return self

    def for_teacher(self) -> ChatCorpus:
        """A from-scratch teacher trains on the same rows."""
        return self

    @property
    def fingerprint(self) -> str:
        """16 hex characters of sha256 over the rows of both splits (as canonical JSON) and the eval cap."""
        digest = hashlib.sha256(f"kdcore-chat-1 {self.max_eval_samples}".encode())
        for name, rows in (("train", self.train_rows), ("eval", self.eval_rows)):
            digest.update(f"\0{name} {len(rows)}".encode())
            for number, row in rows:
                digest.update(f"{number} {json.dumps(row, sort_keys=True, ensure_ascii=False)}\n".encode())
        return digest.hexdigest()[:16]

    def pack(
        self, tokenizer: Any, seq_len: int, notes: list[str] | None = None
    ) -> tuple[PackedDataset, PackedDataset]:
        """``(train, eval)``: one sample per row, assistant/completion labels; rows cut at ``seq_len`` or
        dropped for want of a target are reported in ``notes``."""
        eval_rows = self.eval_rows[: self.max_eval_samples] if self.max_eval_samples else self.eval_rows
        packed = []
        for name, rows, source in (
            ("training split", self.train_rows, self.train_source),
            ("eval split", eval_rows, self.eval_source),
        ):
            samples = encode_chat(rows, tokenizer, seq_len, source=f"'{source}'")
            if notes is not None and samples.truncated:
                notes.append(
                    f"{name}: {len(samples.truncated)} row(s) cut at seq_len={seq_len} ({_lines(samples.truncated)})"
                )
            if notes is not None and samples.dropped:
                notes.append(
                    f"{name}: {len(samples.dropped)} row(s) dropped, no assistant token within seq_len={seq_len} "
                    f"({_lines(samples.dropped)})"
                )
            prompt_lengths = (samples.labels != IGNORE_INDEX).long().argmax(dim=1)
            packed.append(
                PackedDataset(
                    samples.input_ids,
                    samples.attention_mask,
                    labels=samples.labels,
                    prompt_lengths=prompt_lengths,
                )
            )
        train, eval_set = packed
        return train, eval_set.head(self.max_eval_samples)


def load_chat_corpus(
    source: str, eval_source: str | None, eval_fraction: float, max_eval_samples: int | None = None
) -> ChatCorpus:
    """The rows of ``source`` (a ``.jsonl`` file); eval is ``eval_source``'s rows, else the last
    ``eval_fraction`` of them (at least one row each side)."""
    rows = read_jsonl(source)
    if eval_source is not None:
        return ChatCorpus(rows, read_jsonl(eval_source), source, eval_source, max_eval_samples)
    held = max(1, round(len(rows) * eval_fraction))
    if held >= len(rows):
        raise KdError(
            f"'{source}' holds {len(rows)} row(s), too few to hold out {eval_fraction:g} of them for evaluation; "
            "pass more rows, another data.eval_fraction, or data.eval_dataset"
        )
    return ChatCorpus(rows[:-held], rows[-held:], source, source, max_eval_samples)
