"""Render a chat conversation with a chat template into tokens and a mask of the tokens the model should learn.

SFT trains on what the assistant says and nothing else, so every token of a rendered conversation must be known
to be an assistant token or not. Two ways exist: a template's `{% generation %}` blocks (few templates have them;
SmolLM2's does not), or rendering the conversation prefix by prefix. This module does the latter, which works
with any template that renders a conversation as the concatenation of its turns (ChatML, Llama 3, Mistral,
Gemma, ...):

- for each assistant turn k, ``before`` = render(messages[:k], add_generation_prompt=True) and ``after`` =
  render(messages[:k+1]); the assistant's part is ``after[len(before):]``: its content plus the template's
  end-of-turn marker (``<|im_end|>``). Whitespace after that marker (ChatML's newline) is the template's
  separator between turns, not something the model has to say, so it is left out of the loss;
- each render must extend the previous one (checked); a template that rewrites earlier turns when later ones
  are added (e.g. one that drops past reasoning) cannot be masked this way and is refused for that row;
- the text is cut into alternating non-assistant / assistant pieces, each piece is tokenized alone, and the
  concatenated tokens must equal the tokens of the whole conversation tokenized at once (checked). So the
  mask is exact for the very tokens training sees, never an approximation at a piece boundary.

A conversation that fails a check raises `RenderError`; the SFT reader reports it as a malformed row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from llmhpc.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
"""Roles a message may have (OpenAI / TRL); any other is reported, so a typo never silently loses a turn's loss."""

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template (no default system prompt), selectable as `data.chat_template=chatml`; it needs the
tokenizer to know <|im_start|> and <|im_end|> as special tokens (SmolLM2, Qwen and others do)."""

BUILTIN_TEMPLATES = {"chatml": CHATML}

Message = dict[str, str]


class RenderError(ValueError):
    """A conversation the template cannot turn into tokens with an exact assistant mask (a row-level problem)."""


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "tokenizer")


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str:
    """The Jinja template to render with: `chat_template` if given, else the tokenizer's own.

    `chat_template` is a built-in name ('chatml'), a Jinja template string (anything containing '{{' or '{%'),
    or a path to a file holding one. Without it the tokenizer's template is used (what `load_pretrained` and
    `load_tokenizer` return carries the model's); a tokenizer without one is an `InputError` naming the fix.
    """
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise InputError(
                f"{path}: data.chat_template is neither a file, a Jinja template (with '{{{{' or '{{%') nor one of "
                f"{', '.join(BUILTIN_TEMPLATES)}; give a .jinja file, a template string or a built-in name"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the chat template ({e}); give a readable UTF-8 file") from None
        if not text.strip():
            raise InputError(f"{path}: the chat template file is empty; give a Jinja chat template")
        return text
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates (HF allows it): the default one renders chats
        template = template.get("default")
    if not template:
        raise InputError(
            f"{_tokenizer_name(tokenizer)}: the model's tokenizer has no chat template, so chat rows cannot be "
            "rendered; set data.chat_template to a Jinja template (string or file) or to 'chatml'"
        )
    return template


@dataclass(frozen=True)
class Rendered:
    """One rendered conversation: its tokens and which of them the assistant says (the ones to learn)."""

    input_ids: list[int]
    assistant_mask: list[bool]


class ChatRenderer:
    """Tokenizes conversations with a chat template and marks the assistant tokens (see the module docstring).

    `last_turn_only`: only the last assistant turn is learned; earlier assistant turns are context, like the
    user's (useful when earlier answers come from another model, or to match a single-answer eval).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        last_turn_only: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.last_turn_only = last_turn_only

    def text(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        """The template's rendering of `messages` (with the assistant header appended if `generation_prompt`)."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # a Jinja error (raise_exception in the template, undefined variable, ...)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RenderError(f"the chat template cannot render this conversation ({reason})") from None

    def encode(self, text: str) -> list[int]:
        """Tokens of `text` as training sees them: the template writes any BOS itself, so none is added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, messages: Sequence[Message], exact: bool = True) -> Rendered:
        """Tokens of the whole conversation and the assistant mask (True = a token the assistant says).

        `exact`: RenderError when tokenizing the turns one by one differs from tokenizing the whole text (a token
        spans a turn boundary, e.g. an answer that starts with two spaces), so training learns only from text the
        way it tokenizes whole. False returns the turn-by-turn tokens instead: what a model that writes the answer
        after the prompt's tokens produces, for scoring sampled answers, which may start or end anyhow."""
        assistant_turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        trained = set(assistant_turns[-1:] if self.last_turn_only else assistant_turns)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for k in assistant_turns:
            before = self.text(messages[:k], generation_prompt=True)
            after = self.text(messages[: k + 1])
            _require_extends(done, before, f"the prompt before message {k + 1} (assistant)")
            _require_extends(before, after, f"message {k + 1} (assistant)")
            said = after[len(before) :].rstrip()  # trailing whitespace is the template's turn separator
            pieces += [(before[len(done) :], False), (said, k in trained)]
            done = before + said
        full = self.text(messages)
        _require_extends(done, full, "the whole conversation")
        pieces.append((full[len(done) :], False))
        input_ids: list[int] = []
        mask: list[bool] = []
        for text, is_assistant in pieces:
            if text:
                ids = self.encode(text)
                input_ids += ids
                mask += [is_assistant] * len(ids)
        if exact and input_ids != self.encode(full):
            raise RenderError(
                "tokenizing the template's turns one by one gives other tokens than tokenizing the whole "
                "conversation (a token spans a turn boundary), so the assistant mask would be inexact"
            )
        return Rendered(input_ids, mask)


def _require_extends(prefix: str, text: str, what: str) -> None:
    if not text.startswith(prefix):
        raise RenderError(
            f"the chat template renders {what} differently from the conversation before it (it does not "
            "extend the earlier turns' text), so the assistant tokens cannot be located; use a template that "
            "renders turns in order (data.chat_template)"
        )
