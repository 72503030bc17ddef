"""Whether a separate teacher model can score the student's tokens: the same vocabulary size and a tokenizer that
encodes a sample of the training text (`sample_texts`) as the student's does."""

from __future__ import annotations

import itertools
import logging
from typing import Any

logger = logging.getLogger(__name__)


def check_same_vocabulary(student_config: Any, teacher_config: Any, name: str) -> None:
    """Refuse a teacher whose text vocabulary size differs from the student's (log-probs and distributions are
    compared token id by token id), naming both sizes."""
    student = student_config.get_text_config().vocab_size
    teacher = teacher_config.get_text_config().vocab_size
    if student != teacher:
        raise ValueError(
            f"teacher_model {name!r} has vocab_size {teacher} but the student has vocab_size {student}: the teacher "
            "must share the student's tokenizer and vocabulary (the same family, with the same padded embedding size)"
        )


def check_same_tokenizer(student: Any, teacher: Any | None, texts: list[str], name: str) -> None:
    """Refuse a teacher tokenizer (None: the teacher has none saved, nothing to compare) of another length, or that
    encodes one of `texts` (a sample of the training prompts) differently from the student's."""
    if teacher is None:
        logger.info("teacher_model %r has no tokenizer of its own: the vocabulary size alone was checked", name)
        return
    if len(teacher) != len(student):
        raise ValueError(
            f"teacher_model {name!r} has a tokenizer of {len(teacher)} tokens but the student's has {len(student)}: "
            "the teacher must share the student's tokenizer"
        )
    for index, text in enumerate(texts):
        ours = student(text, add_special_tokens=False)["input_ids"]
        theirs = teacher(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ValueError(
                f"teacher_model {name!r} tokenizes training text {index} ({text[:60]!r}) differently from the student "
                f"(first ids {theirs[:8]} vs {ours[:8]}): the teacher must share the student's tokenizer"
            )


def sample_texts(dataset: Any, columns: tuple[str, ...], rows: int = 8) -> list[str]:
    """The text of the first `rows` rows of `dataset` in `columns` (plain strings, or the text of every message of a
    conversation), for the tokenizer check; an unreadable dataset gives none."""
    if dataset is None or isinstance(dataset, dict):
        return []
    texts: list[str] = []
    for row in itertools.islice(iter(dataset), rows):
        for column in columns:
            texts.extend(_texts(row.get(column)) if isinstance(row, dict) else [])
    return [text for text in texts if text]


def _texts(value: Any) -> list[str]:
    """The strings of a prompt: itself, or each message's text content (text blocks included)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    texts = []
    for message in value:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return texts
