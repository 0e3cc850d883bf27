"""The plain chat template: how chat messages become a prompt for a base language model.

The models here are base models (no instruction tuning, no special chat tokens), so the
template is plain text a base model can continue, the way a transcript reads:

    {system message}\\n\\n              (each system / developer message, in order)
    User: {user message}\\n
    Assistant: {assistant message}\\n
    ...
    Assistant:

The prompt ends with "Assistant:" and the model writes the reply after it. Generation also
stops at "\\nUser:" (added to the request's own stop strings), so the model does not go on to
write the user's next turn. Message text is stripped of leading/trailing whitespace. The
template is `microtransformer.chat_template`, shared with `prepare` (chat records for fine-tuning).
"""

from __future__ import annotations

from microtransformer.chat_template import render_prompt
from microtransformer.serve.protocol import ChatMessage

CHAT_STOP = ("\nUser:",)


def message_text(message: ChatMessage) -> str:
    """The message's text (content parts joined)."""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def render_chat(messages: list[ChatMessage]) -> str:
    """Messages -> the prompt text of the template above (`chat_template.render_prompt`)."""
    return render_prompt([(message.role, message_text(message)) for message in messages])
