"""Chat conversations to token ids, with user text never read as control tokens.

The model's chat template is rendered around the messages' content as usual. Tokenizing the
rendered text as one string would turn any control-token text inside a message (`</s>`,
`<|assistant|>`, ...) into the control token itself, letting a user end a turn or fake one. So
when a message contains the text of one of the tokenizer's added tokens, the template is rendered
around placeholders instead, and each message's content is tokenized on its own as plain text
(`split_special_tokens`), as chat endpoints of vLLM and TGI do for user content. Conversations
without such text take the ordinary path, so their ids are exactly `apply_chat_template`'s.
"""

from __future__ import annotations

import copy
import re
import secrets
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from loraserve.errors import FailedPrecondition, InvalidArgument
from loraserve.validation import ChatMessage


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of the conversation with the generation prompt for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("the model's tokenizer has no chat template; use Generate with a raw prompt")
    markers = control_texts(tokenizer)
    if any(marker in m.content for m in messages for marker in markers):
        return _render_with_plain_content(tokenizer, messages)
    return _ids(_apply_template(tokenizer, [_as_dict(m.role, m.content) for m in messages], tokenize=True))


def control_texts(tokenizer: Any) -> list[str]:
    """The texts that the tokenizer would read as one added (control) token."""
    return [text for text in tokenizer.get_added_vocab() if text]


def _render_with_plain_content(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    # A nonce that no message contains, so a user cannot forge a placeholder either.
    nonce = secrets.token_hex(8)
    placeholders = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    text = _apply_template(
        tokenizer,
        [_as_dict(m.role, placeholder) for m, placeholder in zip(messages, placeholders)],
        tokenize=False,
    )
    pattern = re.compile("\ue000" + nonce + r":(\d+)\ue001")
    ids: list[int] = []
    position = 0
    for match in pattern.finditer(text):
        ids += _encode(tokenizer, text[position : match.start()], plain=False)
        ids += _encode(tokenizer, messages[int(match.group(1))].content, plain=True)
        position = match.end()
    ids += _encode(tokenizer, text[position:], plain=False)
    return ids


def _encode(tokenizer: Any, text: str, plain: bool) -> list[int]:
    if not text:
        return []
    # The template's own text may hold control tokens (BOS, role markers); user content may not.
    return list(_reading(tokenizer, split_special_tokens=plain)(text, add_special_tokens=False)["input_ids"])


# `split_special_tokens=` is no per-call option: a fast tokenizer stores it in its shared Rust
# tokenizer before encoding, so a concurrent encode in another thread (a raw prompt on the event
# loop, another conversation in a worker thread) could flip it in between, and user content would
# be read as control tokens again. So the tokenizer is only ever called with its own setting, and
# the other reading goes through a private copy made with the flag set: neither flag changes.
_twins: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_twins_lock = threading.Lock()


def _reading(tokenizer: Any, split_special_tokens: bool) -> Any:
    """The tokenizer, or its copy (made once), whose own setting is `split_special_tokens`."""
    if bool(getattr(tokenizer, "split_special_tokens", False)) == split_special_tokens:
        return tokenizer
    with _twins_lock:
        twin = _twins.get(tokenizer)
        if twin is None:
            twin = copy.deepcopy(tokenizer)
            twin.split_special_tokens = split_special_tokens
            _twins[tokenizer] = twin
    return twin


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], tokenize: bool) -> Any:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
    except Exception as error:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
        raise InvalidArgument(f"messages: the chat template refused them: {error}") from None


def _as_dict(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _ids(rendered: Any) -> list[int]:
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return list(rendered)
