"""Chat messages to prompt text with the model's own Jinja template.

Templates come from model files, so they are untrusted code: they render in
jinja2's ImmutableSandboxedEnvironment, set up the way Hugging Face
transformers sets it up for `apply_chat_template` (trim_blocks, lstrip_blocks,
loop controls, a `tojson` that does not HTML-escape, `raise_exception`,
`strftime_now`, a no-op `{% generation %}` block), so a model's template
renders here as it does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError

# Used when a model ships no template: ChatML, as SmolLM2, Qwen2 and many
# fine-tunes use it. Each message becomes
#   <|im_start|>{role}\n{content}<|im_end|>\n
# and the generation prompt is "<|im_start|>assistant\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# How the text parts of a list-valued `content` are joined into one string.
CONTENT_PART_SEPARATOR = "\n"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training
    masks; for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore names so templates cannot reach internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace ({name!r})"
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any, where: str):
    """A copy of template data made of plain JSON-like values."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where} holds a {type(value).__name__}, which a chat template cannot use")


def normalize_messages(messages) -> list[dict]:
    """Checked copies of chat messages, text-part contents joined into one string.

    Each message is a dict with a string `role` and a `content` that is a
    string, a list of text parts ({"type": "text", "text": ...} or plain
    strings), or None on an assistant message carrying `tool_calls`. Other keys
    (name, tool_calls, tool_call_id, ...) pass through. Raises ValueError
    naming the offending field.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}.role must be a non-empty string")
        msg = _plain(m, where)
        content = m.get("content")
        if isinstance(content, str):
            pass
        elif content is None:
            if not m.get("tool_calls"):
                raise ValueError(
                    f"{where}.content is missing"
                    if "content" not in m
                    else f"{where}.content must be a string or a list of text parts, got null"
                )
        elif isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if isinstance(part, str):
                    texts.append(part)
                    continue
                if not isinstance(part, dict):
                    raise ValueError(f"{pw} must be a text part object, got {type(part).__name__}")
                kind = part.get("type", "text")
                if kind not in ("text", "input_text"):
                    raise ValueError(f"{pw}.type {kind!r} is not supported (only text parts)")
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{pw}.text must be a string")
                texts.append(text)
            msg["content"] = CONTENT_PART_SEPARATOR.join(texts)
        else:
            raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template; `render` turns messages into prompt text."""

    def __init__(self, template: Optional[str], bos_token: str = "", eos_token: str = "", **special: Any) -> None:
        if template is not None and not isinstance(template, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
        self.source = template if template else DEFAULT_CHAT_TEMPLATE
        self.is_default = not template
        self._variables = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self._variables.update(special)
        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from e

    def render(self, messages, add_generation_prompt: bool = True, tools=None, documents=None, **kwargs: Any) -> str:
        """Prompt text for `messages`; extra kwargs reach the template as variables."""
        msgs = normalize_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
                raise ValueError("tools must be a list of tool objects")
            tools = _plain(tools, "tools")
        if documents is not None:
            if not isinstance(documents, (list, tuple)) or not all(isinstance(d, dict) for d in documents):
                raise ValueError("documents must be a list of objects")
            documents = _plain(documents, "documents")
        variables = dict(self._variables)
        variables.update(_plain(kwargs, "template kwargs"))
        variables.update(
            messages=msgs, tools=tools, documents=documents, add_generation_prompt=bool(add_generation_prompt)
        )
        try:
            return self._compiled.render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e.message or e}") from e
        except RecursionError as e:
            raise ChatTemplateError("chat template recursed too deeply") from e
        except Exception as e:  # a template can make Python raise anything (1/0, bad indexing...)
            raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate(default={self.is_default}, {len(self.source)} chars)"
