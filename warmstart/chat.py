"""Chat prompts rendered with the checkpoint's own chat template, the way transformers renders them.

A checkpoint's template is ``chat_template.jinja`` when that file exists, else ``tokenizer_config.json``'s
``chat_template`` (a string, or the list of ``{"name", "template"}`` objects / mapping of named templates,
of which ``"default"`` is used), as ``transformers`` picks it. Rendering follows
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``: a Jinja
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension and the ``{% generation %}`` block tag, the globals ``raise_exception``, ``strftime_now``,
``dict`` and ``namespace`` (one that refuses underscore names), the ``tojson`` filter with
``ensure_ascii``/``indent``/``separators``/``sort_keys`` and no HTML escaping, and the variables
``messages``, ``tools`` and ``documents`` (both None), ``add_generation_prompt`` and the tokenizer's named
special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``,
``mask_token``, as tokenizer_config.json sets them). The rendered text already holds the special tokens the
template writes, so it is tokenized without adding any (as transformers does).

Messages are checked strictly first (:func:`validate_messages`): a role outside :data:`CHAT_ROLES`, a key
other than ``role`` and ``content``, or content that is neither a string nor a list of text parts is refused,
naming the message. Text parts are joined with a newline (as vLLM does). Content that spells one of the
tokenizer's control tokens (its special added tokens, and added tokens the template writes, such as
``<|im_start|>``) is refused too (:func:`check_control_tokens`): it would be tokenized as that token and
could open a turn the client did not send.

Nothing here imports transformers; jinja2 is imported when a template is first compiled.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from warmstart.errors import MissingDependency, WarmstartError

__all__ = [
    "CHAT_ROLES",
    "SPECIAL_TOKEN_NAMES",
    "ChatError",
    "ChatTemplate",
    "ChatTemplateInvalid",
    "ChatTemplateRefused",
    "ControlTokenInContent",
    "InvalidMessages",
    "NoChatTemplate",
    "check_control_tokens",
    "control_tokens",
    "end_of_turn_ids",
    "special_tokens",
    "validate_messages",
]

CHAT_ROLES = ("system", "user", "assistant", "tool")
# the named special tokens transformers passes to every template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
JINJA_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes (transformers refuses them too)


class ChatError(WarmstartError, ValueError):
    """A chat request cannot be turned into a prompt (a 400 / INVALID_ARG)."""


class InvalidMessages(ChatError):
    """``messages`` is not a non-empty list of ``{role, content}`` objects this server renders."""


class NoChatTemplate(ChatError):
    """The model's checkpoint has no chat template."""


class ChatTemplateInvalid(ChatError):
    """The checkpoint's chat template is malformed: not a string, no default among named ones, or it does
    not compile."""


class ChatTemplateRefused(ChatError):
    """The template raised while rendering these messages (``raise_exception``, e.g. Gemma on a system
    message, or an error of the template's own code)."""


class ControlTokenInContent(ChatError):
    """A message's content spells one of the tokenizer's control tokens."""


# -- messages -------------------------------------------------------------------------------------------------


def _content_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping)
        and set(p) == {"type", "text"}
        and p["type"] == "text"
        and isinstance(p["text"], str)
        for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise InvalidMessages(
        f"messages[{i}].content must be a string or a list of text parts "
        '({"type": "text", "text": ...}); images, audio and tool calls are not supported'
    )


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` checked and normalized to ``[{"role": str, "content": str}, ...]``.

    Raises :class:`InvalidMessages` naming the first message that is not an object with exactly ``role``
    (one of :data:`CHAT_ROLES`) and ``content`` (a string or a list of text parts, joined with newlines).
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidMessages(f"messages[{i}] must be an object with 'role' and 'content'")
        extra = sorted(str(k)[:40] for k in m if k not in ("role", "content"))
        if extra:
            raise InvalidMessages(
                f"messages[{i}] has unsupported key(s) {extra}; only 'role' and 'content' are supported"
            )
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InvalidMessages(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {str(role)[:40]!r}"
            )
        out.append({"role": str(role), "content": _content_text(i, m.get("content"))})
    return out


def control_tokens(added_tokens: Iterable[tuple[str, bool]], template: str) -> tuple[str, ...]:
    """The tokens a message must not spell: of the tokenizer's added tokens (``(content, special)`` pairs),
    the special ones and those the template's text contains (whitespace tokens excepted), as transformers'
    ``sanitize_control_tokens`` chooses them."""
    out = {c for c, special in added_tokens if c and (special or (c in template and not c.isspace()))}
    return tuple(sorted(out, key=lambda c: (-len(c), c)))


def check_control_tokens(messages: Sequence[Mapping[str, str]], tokens: Sequence[str]) -> None:
    """Raise :class:`ControlTokenInContent` when a message's content contains one of ``tokens``."""
    if not tokens:
        return
    pattern = re.compile("|".join(re.escape(t) for t in tokens))
    for i, m in enumerate(messages):
        hit = pattern.search(m["content"])
        if hit:
            raise ControlTokenInContent(
                f"messages[{i}].content contains {hit.group(0)!r}, one of the model's control tokens: it would "
                "be read as that token (a turn marker), not as text; remove it from the message"
            )


# -- the checkpoint's template ----------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return str(value["content"])
    return None


def special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of ``tokenizer_config.json`` (strings or serialized AddedTokens)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(tokenizer_config.get(name))
        if text is not None:
            out[name] = text
    return out


def _select(value: Any) -> str | None:
    """The template transformers uses from ``tokenizer_config.json``'s ``chat_template`` value."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    named: Mapping[str, Any]
    if isinstance(value, list):
        if not all(isinstance(t, Mapping) and {"name", "template"} <= set(t) for t in value):
            raise ChatTemplateInvalid(
                f"{TOKENIZER_CONFIG_FILE}'s chat_template list must hold {{'name', 'template'}} objects"
            )
        named = {t["name"]: t["template"] for t in value}
    elif isinstance(value, Mapping):
        named = value
    else:
        raise ChatTemplateInvalid(
            f"{TOKENIZER_CONFIG_FILE}'s chat_template must be a string or named templates, "
            f"got {type(value).__name__}"
        )
    if "default" not in named:
        raise ChatTemplateInvalid(
            f"{TOKENIZER_CONFIG_FILE} holds named chat templates {sorted(map(str, named))[:8]} but none named "
            "'default'; name one 'default'"
        )
    chosen = named["default"]
    if not isinstance(chosen, str):
        raise ChatTemplateInvalid(f"{TOKENIZER_CONFIG_FILE}'s 'default' chat template must be a string")
    return chosen


class ChatTemplate:
    """A checkpoint's chat template and the special tokens it is rendered with (compiled on first use)."""

    def __init__(self, source: str, tokens: Mapping[str, str] | None = None, *, origin: str = "") -> None:
        self.source = source
        self.special_tokens = dict(tokens or {})
        self.origin = origin or "the chat template"
        self._compiled: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_files(
        cls, tokenizer_config: Mapping[str, Any] | None, jinja_text: str | None
    ) -> ChatTemplate | None:
        """The template of a checkpoint holding ``tokenizer_config.json`` (parsed, or None) and
        ``chat_template.jinja`` (its text, or None); None when it has neither. The file wins, as in
        transformers. Raises :class:`ChatTemplateInvalid` for a malformed ``chat_template`` value."""
        config = tokenizer_config or {}
        source: str | None = jinja_text
        origin = JINJA_FILE
        if source is None:
            source, origin = _select(config.get("chat_template")), TOKENIZER_CONFIG_FILE
        if source is None:
            return None
        return cls(source, special_tokens(config), origin=origin)

    def _environment(self) -> Any:
        try:
            import jinja2
            import jinja2.ext
            import jinja2.nodes
            import jinja2.sandbox
            import jinja2.utils
        except ImportError as e:
            raise MissingDependency("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from e
        version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
        if version < _MIN_JINJA:
            raise MissingDependency(
                f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); found "
                f"{jinja2.__version__}"
            )
        return _build_environment()

    def compile(self) -> None:
        """Compile the template now; :class:`ChatTemplateInvalid` when it does not compile."""
        with self._lock:
            if self._compiled is not None:
                return
            env = self._environment()
            import jinja2

            try:
                self._compiled = env.from_string(self.source)
            except jinja2.TemplateError as e:
                raise ChatTemplateInvalid(
                    f"{self.origin} does not compile: {type(e).__name__}: {e}"
                ) from None

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (already validated), the assistant's turn opened when
        ``add_generation_prompt``. Raises :class:`ChatTemplateRefused` when the template raises."""
        self.compile()
        data = [dict(m) for m in messages]  # a fresh copy: templates may not change the caller's messages
        try:
            return str(
                self._compiled.render(
                    messages=data,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                )
            )
        except Exception as e:  # the template's own raise_exception, or an error of its code on this input
            from jinja2 import TemplateError

            if type(e) is TemplateError:  # raise_exception(message)
                raise ChatTemplateRefused(f"the model's chat template refused the messages: {e}") from None
            raise ChatTemplateRefused(
                f"the model's chat template failed on these messages: {type(e).__name__}: {e}"
            ) from None


def _build_environment() -> Any:
    """The sandboxed environment transformers renders chat templates in (``_compile_jinja_template``)."""
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text; it renders its body."""

        tags = {"generation"}  # noqa: RUF012 - jinja's Extension API

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: Any) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # not jinja's own tojson, which escapes HTML characters
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )

    class TemplateNamespace(Namespace):
        """jinja's ``namespace`` refusing underscore names (they lead to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


# -- end of turn ---------------------------------------------------------------------------------------------


def _ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def end_of_turn_ids(
    generation_config: Mapping[str, Any],
    tokenizer_config: Mapping[str, Any],
    token_to_id: Callable[[str], int | None],
) -> frozenset[int]:
    """The ids that end an answer beyond ``config.json``'s ``eos_token_id``: ``generation_config.json``'s
    ``eos_token_id`` (an int or a list: Llama 3 Instruct lists ``<|eot_id|>`` there) and the tokenizer's
    ``eos_token`` (SmolLM2's ``<|im_end|>``), as vLLM stops at both."""
    out = _ids(generation_config.get("eos_token_id"))
    eos = _token_text(tokenizer_config.get("eos_token"))
    if eos:
        tid = token_to_id(eos)
        if tid is not None:
            out.add(int(tid))
    return frozenset(t for t in out if t >= 0)
