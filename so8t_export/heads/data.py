"""Labelled examples for the safety and authority heads: one JSON object a line (JSONL).

    {"text": "...", "safety": "unsafe"}                                   scored at the text's last token
    {"messages": [{"role": "user", "content": "..."}], "safety": "safe", "authority": "escalate"}
    {"messages": [...], "response": "The user asks", "safety": "safe"}

A ``messages`` example is rendered with the model's chat template and its generation prompt, and scored at
the last prompt token: the position where the runtime scores a chat prompt before it answers. With a
``response`` (the beginning of the model's reply, reasoning included, as it streams), the response follows the
generation prompt and the example is scored at its last token: where the output gate scores a reply. An example
carries one label or both; a head is fitted and measured on the examples that carry its label. Every
malformed line is a DataError naming the file, the line number and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import HEAD_LABELS
from ..io import require_regular_file

ROLES = ("system", "user", "assistant", "tool")
KEYS = ("text", "messages", "response", *HEAD_LABELS, "id")  # "id" is the user's own reference, carried and ignored


class DataError(ValueError):
    """A data file that cannot be used; names the file, the line and the key."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in its file, for messages about it
    text: str | None  # exactly one of text and messages is set
    messages: tuple[dict, ...] | None
    labels: dict[str, int]  # head -> class index (HEAD_LABELS order); heads without a label are absent
    response: str | None = None  # with messages only: the reply's beginning, after the generation prompt

    def scored_text(self, render) -> str:
        """The text whose last token is scored; render(messages) is the chat template with its generation
        prompt."""
        if self.text is not None:
            return self.text
        return render(list(self.messages)) + (self.response or "")


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file; blank lines are skipped. DataError on the first malformed line, on an
    unreadable file and on a file without examples."""
    path = Path(path)
    require_regular_file(path, "data file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file: {err.strerror or err}") from None
    examples = []
    # A byte-order mark (Windows editors, Excel's "CSV UTF-8" habits) and CRLF line ends are accepted:
    # json.loads reads the trailing \r as whitespace.
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            examples.append(parse_example(line, path, number))
    if not examples:
        raise DataError(f"{path}: no examples (expected one JSON object a line)")
    return examples


def parse_example(line: bytes | str, path: str | Path, number: int) -> Example:
    where = f"{path}:{number}"
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    unknown = [key for key in record if key not in KEYS]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(KEYS)}")
    if ("text" in record) == ("messages" in record):
        raise DataError(f"{where}: expected exactly one of 'text' and 'messages', found "
                        f"{'both' if 'text' in record else 'neither'}")
    text = messages = None
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string, found {_shown(text)}")
    else:
        messages = _messages(record["messages"], where)
    response = record.get("response")
    if "response" in record and (messages is None or not isinstance(response, str) or not response):
        raise DataError(f"{where}: 'response' must be a non-empty string after 'messages', found "
                        f"{_shown(response) if messages is not None else 'it beside text'}")
    labels = {}
    for head, names in HEAD_LABELS.items():
        if head in record:
            value = record[head]
            if value not in names or not isinstance(value, str):
                raise DataError(f"{where}: {head!r} = {_shown(value)}; expected "
                                f"{' or '.join(repr(n) for n in names)}")
            labels[head] = names.index(value)
    if not labels:
        raise DataError(f"{where}: no label; expected 'safety' and/or 'authority'")
    return Example(number, text, messages, labels, response)


def _messages(value, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages, found {_shown(value)}")
    for i, message in enumerate(value):
        key = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key} must be an object with 'role' and 'content', found "
                            f"{_shown(message)}")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: {key}.role = {_shown(message.get('role'))}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {key}.content must be a string, found {_shown(message.get('content'))}")
        extra = message.get("reasoning_content")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: {key}.reasoning_content must be a string, found {_shown(extra)}")
    return tuple(value)


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def labelled(examples: list[Example], head: str) -> tuple[list[int], list[int]]:
    """(indices into examples, class indices) of the examples that carry head's label."""
    pairs = [(i, example.labels[head]) for i, example in enumerate(examples) if head in example.labels]
    return [i for i, _ in pairs], [label for _, label in pairs]
