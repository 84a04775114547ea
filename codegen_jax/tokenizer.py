"""Tokenizer and chat template from a checkpoint directory (tokenizer.json, tokenizer_config.json, chat template).

Encoding goes through the `tokenizers` library (the same Rust code transformers uses); chat templates are rendered
with jinja2 configured as transformers configures it, so prompts are token-identical to `apply_chat_template`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from codegen_jax.checkpoint import CheckpointError


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config: dict, chat_template: str | None):
        self.tok = tok
        self.config = config
        self.chat_template = chat_template

        def token(key):
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        self.special = {k: token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_token_id = tok.token_to_id(self.special["eos_token"]) if self.special["eos_token"] else None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{directory}: missing tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise CheckpointError(f"{path}: cannot load ({str(e).splitlines()[0]})") from e
        config = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **kw) -> str:
        """Renders messages ([{"role": ..., "content": ...}]) to the prompt text."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{**self.special, **kw}
        )

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)  # the template already holds the special tokens


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
