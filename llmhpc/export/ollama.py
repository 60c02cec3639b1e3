"""The Ollama `Modelfile` written beside a GGUF export: FROM the file, the chat TEMPLATE, stop tokens.

Ollama templates are Go templates over `.Messages` (every message, system ones included, in order; Ollama
merges consecutive messages of one role) and always end with the assistant's opening. A chat template is
converted only when it is ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, as SmolLM2's and
Qwen's are), with or without a default system message for conversations that do not start with one. That
is decided by rendering probe conversations through the tokenizer's own (Jinja) template and requiring
exactly the text the Go template gives for them; any other template is left out of the Modelfile, and
Ollama then picks its template from the `tokenizer.chat_template` stored in the GGUF file.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

_PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": " Q2, with spaces \n"},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
]
"""Conversations both renderings must agree on: with and without a system message, several turns, and
content whose surrounding whitespace a template might strip."""


def chatml(messages: list[dict], default_system: str | None) -> str:
    """What the Go template of `chatml_template(default_system)` renders for `messages` (a generation prompt)."""
    text = ""
    if default_system is not None and messages and messages[0]["role"] != "system":
        text += f"{IM_START}system\n{default_system}{IM_END}\n"
    for m in messages:
        text += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
    return text + f"{IM_START}assistant\n"


def chatml_template(default_system: str | None) -> str:
    """The Ollama (Go) template of ChatML, prepending `default_system` when a conversation has no system turn."""
    head = ""
    if default_system is not None:
        head = (
            f'{{{{- if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{IM_START}system\n'
            f"{default_system}{IM_END}\n{{{{ end }}}}{{{{ end }}}}\n"
        )
    return (
        f"{head}{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n"
        f"{{{{ end }}}}{IM_START}assistant\n"
    )


def ollama_template(tokenizer) -> str | None:
    """The tokenizer's chat template as an Ollama template, or None when it is not (exactly) ChatML."""
    if not getattr(tokenizer, "chat_template", None) or not isinstance(tokenizer.chat_template, str):
        return None
    try:
        renders = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in _PROBES]
    except Exception:  # a template that raises on these plain conversations is not ChatML
        return None
    default = None
    opening = f"{IM_START}system\n"
    if renders[0].startswith(opening):
        default = renders[0][len(opening) :].split(IM_END, 1)[0]
    if default is not None and ("{{" in default or "}}" in default or '"""' in default):
        return None  # would need escaping in a Go template inside a Modelfile
    if any(render != chatml(m, default) for m, render in zip(_PROBES, renders, strict=True)):
        return None
    return chatml_template(default)


def stop_tokens(tokenizer, chatml_format: bool) -> list[str]:
    """Where generation stops: the end-of-sequence token, and ChatML's turn markers for a ChatML template."""
    stops = [IM_START, IM_END] if chatml_format else []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and eos not in stops:
        stops.append(eos)
    return [s for s in stops if '"' not in s and "\n" not in s]


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """The Modelfile for `ollama create NAME -f <this file>`, beside the GGUF file named `gguf_name`."""
    template = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append(
            "# no TEMPLATE: the chat template is not ChatML; Ollama reads tokenizer.chat_template from the GGUF file"
        )
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(tokenizer, template is not None)]
    return "\n".join(lines) + "\n"
