"""The VLM's chat template: the LM's own text template, taught to read messages whose content is a list of
parts (`{"type": "image"}`, `{"type": "text", "text": ...}`), as transformers' processors and the
image-text-to-text pipeline write them.

A prelude rewrites each list-content message into the text the LM's template expects (every image as `<image>`
plus a newline, first, then the text, as LLaVA lays out a turn) and hands the result to the unchanged text
template, so the chat format the LM knows stays byte for byte the same and string content passes through as it
is. Seshu fills other modalities in before templating (speech becomes its transcript), so any other part type is
an error rather than a silent drop.
"""

from __future__ import annotations

_PRELUDE = (
    "{%- set seshu_ns = namespace(messages=[]) %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set seshu_ns.messages = seshu_ns.messages + [message] %}"
    "{%- else %}"
    "{%- set seshu_parts = namespace(images='', text='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}"
    "{%- set seshu_parts.images = seshu_parts.images + IMAGE + '\\n' %}"
    "{%- elif part['type'] == 'text' %}"
    "{%- set seshu_parts.text = seshu_parts.text + part['text'] %}"
    "{%- else %}"
    "{{- raise_exception('this model reads image and text parts, not ' + part['type']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set seshu_ns.messages = seshu_ns.messages + "
    "[{'role': message['role'], 'content': seshu_parts.images + seshu_parts.text}] %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set messages = seshu_ns.messages %}"
)


def multimodal_chat_template(text_template: str, image_token: str) -> str:
    """`text_template` with the prelude that turns image and text parts into `image_token` and text."""
    if "seshu_ns" in text_template:  # already ours (a VLM built from a VLM's LM): one prelude is enough
        return text_template
    return _PRELUDE.replace("IMAGE", repr(image_token)) + text_template
