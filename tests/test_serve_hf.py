"""Serving Hugging Face MoE models with their own tokenizer: incremental detokenisation against full
decoding, chat templates against transformers' apply_chat_template, and tiny random Mixtral,
Qwen3-MoE and DeepSeek-V3 checkpoints (converted, and as HF folders) served with a byte-level BPE
tokenizer trained here, whose completions must be transformers' own greedy tokens.

No hub access: models come from ``moekit.hf.testing.tiny_hf_model`` and the tokenizer from
``tiny_tokenizer``.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed; pip install -e '.[dev]'")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed; pip install -e '.[dev]'")

from moekit.data.tokenizer import ByteTokenizer  # noqa: E402
from moekit.hf.convert import convert_folder  # noqa: E402
from moekit.hf.testing import tiny_hf_model, tiny_tokenizer  # noqa: E402
from moekit.serve.engine import GenRequest, ServeLimits  # noqa: E402
from moekit.serve.server import load_engine  # noqa: E402
from moekit.serve.text import HFServeTokenizer, WindowDecoder, load_serve_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

VOCAB = 320
BOS, PAD, EOS = 0, 1, 3  # ids of <s>, <|endoftext|>, <|im_end|> in tiny_tokenizer
FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
PROMPTS = ["The quick brown fox", "Le café est très", "日本語の"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(folder, vocab_size=VOCAB)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> HFServeTokenizer:
    return HFServeTokenizer.load(tok_dir)


def joined(decoder, ids: list[int]) -> str:
    return "".join(decoder.step(i) for i in ids) + decoder.flush()


# ---------------------------------------------------------------------------------------- detokenisation
def test_byte_stream_decoder_equals_full_decode_and_holds_back_partial_characters() -> None:
    tok = ByteTokenizer()
    rng = random.Random(0)
    pool = list("aé日🦊".encode()) + [0x80, 0xC3, 0xE6, 0xF0, 0xFF, 256]
    for _ in range(500):
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(257) for _ in range(rng.randrange(12))]
        assert joined(tok.stream_decoder(), ids) == tok.decode(ids), ids
    fox = "🦊".encode()
    decoder = tok.stream_decoder()
    assert [decoder.step(b) for b in fox] == ["", "", "", "🦊"]
    decoder = tok.stream_decoder()
    assert decoder.step(fox[0]) == "" and decoder.flush() == "\ufffd"
    with pytest.raises(ValueError, match=r"\[0, 256\], got 300"):
        tok.stream_decoder().step(300)


def test_hf_stream_decoder_equals_full_decode_on_random_ids(tok: HFServeTokenizer, tok_dir: Path) -> None:
    """Random ids, specials and lone bytes of multi-byte characters included: the pieces join to
    decode(ids); before the flush they agree with tokenizers' own DecodeStream."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rng = random.Random(0)
    partial = 0
    for _ in range(300):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 16))]
        decoder = tok.stream_decoder()
        pieces = "".join(decoder.step(i) for i in ids)
        assert pieces + decoder.flush() == tok.decode(ids), ids
        reference = DecodeStream(skip_special_tokens=True)
        assert pieces == "".join(piece or "" for piece in (reference.step(raw, i) for i in ids)), ids
        partial += tok.decode(ids).endswith("\ufffd")
    assert partial > 10  # the sequences did end inside multi-byte characters


def test_hf_stream_decoder_in_prompt_context(tok: HFServeTokenizer) -> None:
    text = "Le café est très chaud, déjà prêt. 日本語のテキストです。🦊"
    ids = tok.encode(text)[1:]  # without BOS
    for cut in range(1, len(ids)):
        prompt, rest = ids[:cut], ids[cut:]
        if tok.decode(prompt).endswith("\ufffd"):
            continue
        decoded = joined(tok.stream_decoder(prompt), rest)
        assert decoded == tok.decode(ids)[len(tok.decode(prompt)):] == tok.decode(rest)


def test_stream_decoding_costs_linear_work(tok: HFServeTokenizer) -> None:
    """Decoding n tokens one at a time decodes O(n) ids in all (re-decoding the text so far: O(n^2))."""
    decoded_ids = []

    def counting_decode(ids: list[int]) -> str:
        decoded_ids.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    text = joined(WindowDecoder(counting_decode), ids)
    assert text == tok.decode(ids)
    assert len(ids) > 300 and sum(decoded_ids) < 6 * len(ids)


# ---------------------------------------------------------------------------------------- chat templates
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Quel café ? 🦊"},
     {"role": "assistant", "content": "Un noir."}, {"role": "user", "content": "日本語で"}],
    [{"role": "user", "content": [{"type": "text", "text": "structured \"content\" ü"}]}],
]

# Mixtral's layout: [INST] turns, alternation enforced with raise_exception, a namespace, loop.index0.
INST_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (ns.system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", ["chatml", "inst"])
def test_chat_template_renders_as_transformers_does(tmp_path: Path, template: str) -> None:
    if template == "chatml":
        tiny_tokenizer(tmp_path, vocab_size=VOCAB)
    else:
        tiny_tokenizer(tmp_path, vocab_size=VOCAB, chat_template=INST_TEMPLATE)
    ours = HFServeTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    chats = CHATS if template == "chatml" else CHATS[:2]
    for chat in chats:
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == expected
        # The rendered text already starts with <s>: encoding it adds no second BOS.
        assert ours.encode(ours.render_chat(chat)) == list(theirs.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=True)["input_ids"])
    bad = [{"role": "assistant", "content": "first"}] if template == "inst" else [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception) as their_err:
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="chat template: ") as our_err:
        ours.render_chat(bad)
    assert str(their_err.value) in str(our_err.value)


def test_chat_template_from_its_own_file_and_errors(tmp_path: Path) -> None:
    tiny_tokenizer(tmp_path, vocab_size=VOCAB, chat_template=None)
    with pytest.raises(ValueError, match="^model has no chat template$"):
        HFServeTokenizer.load(tmp_path).render_chat(CHATS[0])
    with pytest.raises(ValueError, match="^model has no chat template$"):
        ByteTokenizer().render_chat(CHATS[0])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert HFServeTokenizer.load(tmp_path).render_chat(CHATS[0]) == "<user>Hello!"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="chat template does not parse"):
        HFServeTokenizer.load(tmp_path)


def test_end_ids_from_tokenizer_config_and_generation_config(tmp_path: Path) -> None:
    tiny_tokenizer(tmp_path, vocab_size=VOCAB)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, PAD]}))
    tok = load_serve_tokenizer(tmp_path)
    assert tok.eos_id == EOS and tok.eos_ids == {EOS, PAD}
    assert tok.encode("Hello") == [BOS, *tok.encode("Hello")[1:]] and tok.encode("Hello")[1:]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id \[5000\] outside"):
        load_serve_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------- serving models
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """family -> (HF model, its save_pretrained folder with the tokenizer, the converted folder)."""
    out = {}
    for family in FAMILIES:
        model = tiny_hf_model(family, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        hf_dir = tmp_path_factory.mktemp(f"{family}_hf")
        model.save_pretrained(hf_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (hf_dir / name).write_bytes((tok_dir / name).read_bytes())
        out[family] = (model, hf_dir, convert_folder(hf_dir, tmp_path_factory.mktemp(f"{family}_moekit")))
    return out


def hf_greedy_ids(model: torch.nn.Module, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' greedy generation, stopping at the end id as the server does."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
    return out[0, len(prompt_ids):].tolist()


def run(engine, reqs: list[GenRequest]) -> list[list[dict]]:
    events: list[list[dict]] = [[] for _ in reqs]
    done = [threading.Event() for _ in reqs]
    for i, r in enumerate(reqs):
        def on_event(ev, i=i):
            events[i].append(ev)
            if ev["type"] in ("done", "error"):
                done[i].set()
        r.on_event = on_event
        engine.submit(r)
    engine.start()
    try:
        for d in done:
            assert d.wait(120), "request did not finish"
    finally:
        engine.stop()
    return events


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["converted", "hf"])
def test_served_completion_is_transformers_greedy_text(family: str, layout: str, checkpoints, tok) -> None:
    hf, hf_dir, converted = checkpoints[family]
    engine = load_engine(converted if layout == "converted" else hf_dir, ServeLimits(max_batch=4))
    assert isinstance(engine.tokenizer, HFServeTokenizer) and engine.tokenizer.eos_ids == {EOS}
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert all(p[0] == BOS for p in prompts)
    reqs = [GenRequest(prompt_ids=p, max_tokens=MAX_TOKENS, temperature=0.0) for p in prompts]
    events = run(engine, reqs)
    assert engine.batchable and engine.counts["batched_steps"] > 0  # gpt-oss (sinks, sliding window) too
    for prompt, req, evs in zip(prompts, reqs, events):
        ref = hf_greedy_ids(hf, prompt, MAX_TOKENS)
        assert req.generated == ref
        streamed = "".join(ev["text"] for ev in evs if ev["type"] in ("token", "done"))
        expected = tok.decode([i for i in ref if i != EOS])
        assert streamed == req.text == expected
        assert evs[-1]["finish_reason"] == ("stop" if ref[-1] == EOS else "length")


def test_served_over_http_with_chat_template(checkpoints, tok) -> None:
    """/v1/completions on a converted model answers with the tokenizer's text; /v1/chat/completions
    renders the chat template and answers as a completion of the rendered prompt (one BOS) does."""
    httpx = pytest.importorskip("httpx", reason="httpx is not installed; pip install -e '.[dev]'")
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    from moekit.serve import BackgroundServer, create_app

    hf, _, converted = checkpoints["mixtral"]
    engine = load_engine(converted, ServeLimits(max_batch=2, max_tokens=16), model_name="tiny-mixtral",
                         max_context=64)
    assert engine.model.config.max_seq_len == 64 and hf.config.max_position_embeddings == 256
    with BackgroundServer(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"model": "tiny-mixtral", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        ref = hf_greedy_ids(hf, tok.encode(PROMPTS[1]), MAX_TOKENS)
        assert r.json()["choices"][0]["text"] == tok.decode([i for i in ref if i != EOS])
        chat = [{"role": "user", "content": "Quel café ?"}]
        rendered = engine.tokenizer.render_chat(chat)
        assert rendered.endswith("<|im_start|>assistant\n")
        r = client.post("/v1/completions", json={**body, "prompt": rendered})
        assert r.status_code == 200, r.text
        ref = hf_greedy_ids(hf, tok.encode(rendered), MAX_TOKENS)
        assert r.json()["choices"][0]["text"] == tok.decode([i for i in ref if i != EOS])
        chat_body = {"model": "tiny-mixtral", "messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = client.post("/v1/chat/completions", json=chat_body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == tok.decode([i for i in ref if i != EOS])
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(rendered))
        r = client.post("/v1/completions", json={**body, "max_tokens": 16, "prompt": "x" * 60})
        assert r.status_code == 400 and "64" in r.json()["error"]["message"], r.text  # a 64-position context


def test_tokenizer_override_and_load_errors(checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moekit.cli import main

    _, _, converted = checkpoints["qwen3_moe"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("moekit_lm.json", "model.safetensors", "hf_config.json"):
        (bare / name).write_bytes((converted / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="holds no tokenizer .*--tokenizer PATH"):
        load_engine(bare)
    assert main(["serve", str(bare)]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(bare), "--max-context", "1"])
    assert isinstance(load_engine(bare, tokenizer="byte").tokenizer, ByteTokenizer)
    lone = tmp_path / "lone"  # a tokenizer.json with no tokenizer_config.json beside it
    lone.mkdir()
    (lone / "tokenizer.json").write_bytes((converted / "tokenizer.json").read_bytes())
    served = load_engine(bare, tokenizer=lone / "tokenizer.json").tokenizer
    assert served.eos_id is None and served.encode("Hi") == HFServeTokenizer.load(converted).encode("Hi")
    with pytest.raises(ValueError, match="^model has no chat template$"):
        served.render_chat(CHATS[0])
    big = tmp_path / "big"
    tiny_tokenizer(big, vocab_size=VOCAB + 40)
    with pytest.raises(ValueError, match=rf"has {VOCAB + 40} ids but the model at .* embeds {VOCAB}"):
        load_engine(bare, tokenizer=big)
