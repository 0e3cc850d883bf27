"""The plain chat template: how chat messages become text for a base language model.

One definition for the two places that need it: `serve` renders a conversation as the prompt
of `/v1/chat/completions`, and `prepare` renders chat records (`{"messages": [...]}`) as training
text whose assistant replies carry the loss. The models here have no special chat tokens, so the
template is plain text a base model can continue, the way a transcript reads:

    {system message}\\n\\n              (each system / developer message, in order)
    User: {user message}\\n
    Assistant: {assistant message}\\n
    ...
    Assistant:

A prompt ends with "Assistant:" and the model writes the reply after it (`serve` also stops
generation at "\\nUser:"). Message text is stripped of leading/trailing whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "developer", "user", "assistant")
ROLE_PREFIX = {"user": "User: ", "assistant": "Assistant: "}
REPLY_PREFIX = "Assistant:"  # a prompt ends here; the reply starts with its space


def chat_segments(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """(role, text) turns -> the transcript as (text, is_reply) pieces, joined in order.

    Each assistant turn is cut after "Assistant:": the piece before it is prompt (what the
    model reads), " {reply}\\n" is reply (what the model writes). "".join of the pieces is the
    transcript above, without the final "Assistant:" a prompt adds (`render_prompt`).
    """
    pieces: list[tuple[str, bool]] = []
    prompt = ""
    for role, text in turns:
        text = text.strip()
        if role in ("system", "developer"):
            prompt += f"{text}\n\n"
        elif role == "user":
            prompt += f"{ROLE_PREFIX['user']}{text}\n"
        else:  # assistant
            pieces += [(prompt + REPLY_PREFIX, False), (f" {text}\n", True)]
            prompt = ""
    if prompt:
        pieces.append((prompt, False))
    return pieces


def render_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """(role, text) turns -> the prompt text: the transcript, then "Assistant:"."""
    return "".join(text for text, _ in chat_segments(turns)) + REPLY_PREFIX
