"""Instruction and chat records: which text of a JSONL record the model reads and which it learns.

`prepare` accepts two record shapes besides plain text (`{"text": ...}`):

    {"prompt": "Q: 2+3?\\nA:", "completion": " 5"}        the completion is learned
    {"messages": [{"role": "user", "content": "2+3?"},      the assistant replies are learned,
                  {"role": "assistant", "content": "5"}]}   in `serve`'s chat template

`record_segments` turns a record into (text, learned) pieces. Every record ends with the
end-of-text token, learned too (the model learns to stop), so a prompt/completion record is
`prompt completion<|endoftext|>`, and a chat record is the template's transcript
(`chat_template.chat_segments`) whose last reply ends with `<|endoftext|>` instead of its
newline. Each piece is tokenized on its own, so the prompt's tokens are exactly those `serve`
feeds the model for the same conversation.
"""

from __future__ import annotations

from typing import Any

from microtransformer.chat_template import ROLES, chat_segments
from microtransformer.errors import UserError

PROMPT_KEYS = ("prompt", "completion")
MESSAGES_KEY = "messages"


def is_instruction_record(record: dict[str, Any], text_field: str) -> bool:
    """True when `record` is a prompt/completion or chat record (and has no `text_field`)."""
    return text_field not in record and (MESSAGES_KEY in record or "completion" in record)


def record_segments(record: dict[str, Any], where: str) -> list[tuple[str, bool]]:
    """The (text, learned) pieces of an instruction record, without the final end-of-text
    token (the caller adds it, learned). `where` ("file.jsonl:12") starts every error."""
    if MESSAGES_KEY in record:
        return _chat_segments(record[MESSAGES_KEY], where)
    for key in PROMPT_KEYS:
        if not isinstance(record.get(key), str):
            got = type(record[key]).__name__ if key in record else "missing"
            raise UserError(f"{where}: {key!r} must be a string (got {got}); a prompt/"
                            "completion record is {\"prompt\": \"...\", \"completion\": \"...\"}")
    if not record["completion"]:
        raise UserError(f"{where}: 'completion' is empty; give the text the model should learn")
    pieces = [(record["prompt"], False), (record["completion"], True)]
    return [(text, learned) for text, learned in pieces if text]


def _chat_segments(messages: Any, where: str) -> list[tuple[str, bool]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise UserError(f"{where}: messages[{i}] has role {role!r}; use one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{i}] 'content' must be a string (got "
                            f"{type(content).__name__})")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise UserError(f"{where}: the last message has role {turns[-1][0]!r}; a chat record "
                        "ends with the assistant's reply (the text the model learns)")
    pieces = chat_segments(turns)
    text, learned = pieces[-1]  # the last reply: its newline gives way to <|endoftext|>
    pieces[-1] = (text[:-1], learned)
    return [(text, learned) for text, learned in pieces if text]
