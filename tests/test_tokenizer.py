import pytest

from moekit.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

SAMPLES = {
    "latin": "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich; ¿qué tal? żółć",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "cjk": "兰叶春葳蕤，桂华秋皎洁。日本語のテキスト、カタカナ。",
    "code": "def f(x: int) -> int:\n\treturn x ** 2  # square\n",
    "emoji": "ok 👍🏽 done",
}


@pytest.mark.parametrize("script", sorted(SAMPLES))
def test_byte_tokenizer_round_trips_every_script(script):
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLES[script])
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(SAMPLES[script].encode("utf-8"))
    assert tok.decode(ids) == SAMPLES[script]
    assert tok.decode(ids + [tok.eos_id]) == SAMPLES[script]


def test_byte_tokenizer_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"ids must be in \[0, 256\].*300"):
        ByteTokenizer().decode([65, 300])


def test_byte_tokenizer_cut_character_decodes_to_replacement():
    ids = ByteTokenizer().encode("ж")
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


def test_hf_tokenizer_from_local_file_round_trips(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(SAMPLES.values()) * 5, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = load_tokenizer(str(tmp_path))
    assert isinstance(hf, HFTokenizer)
    assert hf.eos_id == tok.token_to_id("<|endoftext|>")
    for text in SAMPLES.values():
        ids = hf.encode(text)
        assert max(ids) < hf.vocab_size
        assert hf.decode(ids) == text


def test_load_tokenizer_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
