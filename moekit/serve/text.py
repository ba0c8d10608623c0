"""Text in and out of a served model: the tokenizer interface the engine and the HTTP app use, and
its Hugging Face implementation (``tokenizers`` plus the folder's tokenizer_config.json).

The interface (``ServeTokenizer``), also implemented by ``moekit.data.tokenizer.ByteTokenizer``:

  encode(text) -> list[int]         as the model's own tokenizer encodes a prompt (BOS included when
                                    its post-processor adds one, never twice)
  decode(ids) -> str                special tokens skipped
  eos_id: int | None                the end-of-sequence id; ``eos_ids`` all ids that end generation
  render_chat(messages) -> str      the chat template, as transformers' ``apply_chat_template(messages,
                                    tokenize=False, add_generation_prompt=True)`` renders it;
                                    ValueError "model has no chat template" when there is none
  stream_decoder(context) -> StreamDecoder   incremental detokenisation of one sequence:
                                    ``step(token_id) -> str`` (new text, "" while a character is
                                    incomplete) and ``flush() -> str`` (what is held back, at the end)

Incremental detokenisation follows the prefix-window scheme of ``tokenizers.decoders.DecodeStream``
(also TGI's and vLLM's): decode a short window of ids, emit the text past the window's already
emitted prefix unless it ends in U+FFFD (an incomplete byte sequence), then slide the window to
start at the chunk just emitted. Each token costs one decode of a few ids instead of the whole
sequence (which made a long completion O(n^2)). Decoding with the last prompt ids as context
keeps what a decoder does at the start of a text (SentencePiece's leading-space strip) from
eating the completion's first space.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

NO_CHAT_TEMPLATE = "model has no chat template"
# Prompt ids given to a stream decoder as context (vLLM uses 5 too).
CONTEXT_IDS = 5


class StreamDecoder(Protocol):
    def step(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class ServeTokenizer(Protocol):
    eos_id: int | None
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...

    def stream_decoder(self, context: Sequence[int] = ()) -> StreamDecoder: ...


class WindowDecoder:
    """Incremental detokenisation over any ``decode(ids) -> str`` whose output for a sequence
    extends its output for a prefix that ended on a whole character (true of byte-level BPE,
    SentencePiece and WordPiece decoders). ``context`` ids are decoded for their effect on the
    first generated token only; their text is never emitted.

    Concatenating every ``step`` and the final ``flush`` gives ``decode(context + ids)`` past
    ``decode(context)``, which for ``context=()`` is ``decode(ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = [int(i) for i in context]
        self._prefix = decode(self._ids) if self._ids else ""  # text of _ids[:_read], all emitted
        self._read = len(self._ids)  # _ids[:_read]: context (emitted); _ids[_read:]: not emitted yet

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix):]
        # The chunk just emitted becomes the context of the next one; the older context goes.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)
        return new

    def flush(self) -> str:
        text = self._decode(self._ids) if self._ids else ""
        new = text[len(self._prefix):]
        self._prefix = text
        return new


def stream_decoder(tokenizer: Any, context: Sequence[int] = ()) -> StreamDecoder:
    """``tokenizer.stream_decoder(context)``, or a WindowDecoder over ``tokenizer.decode`` for
    tokenizers that only decode whole sequences."""
    if hasattr(tokenizer, "stream_decoder"):
        return tokenizer.stream_decoder(context)
    return WindowDecoder(lambda ids: tokenizer.decode(ids), context)


def stop_ids(tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation: ``eos_ids`` where the tokenizer has them, else ``{eos_id}``."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is not None:
        return frozenset(ids)
    eos = getattr(tokenizer, "eos_id", None)
    return frozenset() if eos is None else frozenset([eos])


# ---------------------------------------------------------------------------------------- chat templates
class ChatTemplate:
    """A Hugging Face chat template rendered with jinja2 the way transformers renders it: sandboxed
    environment, trim_blocks and lstrip_blocks, loop controls, a ``tojson`` filter that keeps
    non-ASCII characters, ``raise_exception`` and ``strftime_now``, the tokenizer's special tokens
    (``bos_token``, ``eos_token``, ...) as variables, and ``{% generation %}`` blocks rendered as
    plain text."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller: Callable[[], str]) -> str:
                return caller()

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template does not parse: {err} (line {err.lineno})") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages``; a template error (e.g. its ``raise_exception`` on
        roles out of order) is a ValueError with the template's message."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **extra)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template: {err}") from None


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_source(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template of a tokenizer folder: chat_template.jinja (transformers >= 4.43
    writes it apart), else tokenizer_config.json's ``chat_template`` (a string, or a list of named
    templates of which "default" is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) else None


# ---------------------------------------------------------------------------------------- HF tokenizers
class HFServeTokenizer:
    """A Hugging Face tokenizer for serving, built on a ``tokenizers.Tokenizer``.

    ``load(path)`` reads a folder (tokenizer.json, tokenizer_config.json, chat_template.jinja,
    generation_config.json; a folder without tokenizer.json goes through transformers'
    AutoTokenizer for its fast backend) or a tokenizer.json file.
    """

    def __init__(self, tokenizer: Any, eos_id: int | None, eos_ids: Sequence[int] = (),
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 add_special_tokens: bool = True, name: str = "hf") -> None:
        self._tok = tokenizer
        self.eos_id = eos_id
        self.eos_ids = frozenset(eos_ids) | (frozenset() if eos_id is None else frozenset([eos_id]))
        self.special_tokens = dict(special_tokens or {})
        bos = self.special_tokens.get("bos_token")
        self.bos_id: int | None = tokenizer.token_to_id(bos) if bos else None
        self.add_special_tokens = add_special_tokens
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = name
        self.chat_template = ChatTemplate(chat_template, self.special_tokens) if chat_template else None

    @classmethod
    def load(cls, path: str | Path, add_special_tokens: bool = True) -> HFServeTokenizer:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist (expected a folder or a tokenizer.json)")
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
        else:
            tok = cls._backend_of(folder)
        special = {key: text for key, value in config.items()
                   if key.endswith("_token") and (text := _token_text(value)) is not None}
        eos_id = tok.token_to_id(special["eos_token"]) if "eos_token" in special else None
        eos_ids: list[int] = []
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            value = _read_json(gen_path).get("eos_token_id")
            eos_ids = [value] if isinstance(value, int) else [i for i in (value or []) if isinstance(i, int)]
        if eos_id is None and eos_ids:
            eos_id = eos_ids[0]
        vocab = tok.get_vocab_size(with_added_tokens=True)
        bad = [i for i in eos_ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{gen_path}: eos_token_id {bad} outside the tokenizer's {vocab} ids")
        return cls(tok, eos_id, eos_ids, _chat_source(folder, config), special, add_special_tokens,
                   name=f"hf-{folder.resolve().name}")

    @staticmethod
    def _backend_of(folder: Path) -> Any:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(f"{folder} has no tokenizer.json; loading its tokenizer needs transformers "
                              f"(pip install 'moekit[hf]')") from err
        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{folder}: the tokenizer ({type(auto).__name__}) has no fast `tokenizers` backend")
        return backend

    def encode(self, text: str) -> list[int]:
        """Prompt ids; a BOS the post-processor adds in front of a text that starts with the BOS token
        itself (a rendered chat template) is dropped, as apply_chat_template(tokenize=True) does."""
        ids = self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_template is None:
            raise ValueError(NO_CHAT_TEMPLATE)
        return self.chat_template.render(messages, add_generation_prompt=True)

    def stream_decoder(self, context: Sequence[int] = ()) -> WindowDecoder:
        return WindowDecoder(self.decode, list(context)[-CONTEXT_IDS:])


def load_serve_tokenizer(spec: str | Path | None, add_special_tokens: bool = True) -> Any:
    """``None``/"byte" -> ByteTokenizer; a path -> HFServeTokenizer.load(path)."""
    if spec in (None, "", "byte"):
        from ..data.tokenizer import ByteTokenizer

        return ByteTokenizer()
    return HFServeTokenizer.load(spec, add_special_tokens=add_special_tokens)
