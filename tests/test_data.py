import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moekit.data import debian
from moekit.data.corpus import build_from_source, build_polyglot, cap_per_label, chunk_documents, load_tokens, \
    split_documents
from moekit.data.sources import DataError, Document, load_folder, load_hf, load_jsonl
from moekit.data.tokenizer import ByteTokenizer


def make_folder(root: Path) -> Path:
    texts = {
        "english": ["The quick brown fox jumps over the lazy dog.", "Another English line."],
        "russian": ["Съешь же ещё этих мягких французских булок.", "Привет, мир!"],
        "chinese": ["兰叶春葳蕤，桂华秋皎洁。", "欣欣此生意，自尔为佳节。"],
        "code": ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"],
    }
    for label, docs in texts.items():
        (root / label).mkdir(parents=True)
        for i, t in enumerate(docs):
            (root / label / f"{i}.txt").write_text(t, encoding="utf-8")
    return root


def test_folder_loader_labels_every_document(tmp_path):
    docs, report = load_folder(make_folder(tmp_path / "data"))
    assert sorted({d.label for d in docs}) == ["chinese", "code", "english", "russian"]
    assert len(docs) == 8
    assert report.files == 8 and not report.replaced_bytes_files
    assert any(d.text == "Привет, мир!" and d.label == "russian" for d in docs)


def test_folder_loader_mixed_encodings_are_replaced_and_reported(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "english" / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / "english" / "utf16.txt").write_bytes("naïve".encode("utf-16"))
    (root / "english" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    docs, report = load_folder(root)
    by_source = {Path(d.source).name: d.text for d in docs}
    assert by_source["latin1.txt"] == "caf\ufffd cr\ufffdme"
    assert by_source["utf16.txt"] == "naïve"
    assert "blob.bin" not in by_source
    assert [Path(p).name for p in report.replaced_bytes_files] == ["latin1.txt"]
    assert [Path(p).name for p in report.skipped_binary] == ["blob.bin"]


def test_folder_loader_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        load_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"flat has no sub-folders"):
        load_folder(tmp_path / "flat")
    (tmp_path / "empty" / "lbl").mkdir(parents=True)
    (tmp_path / "empty" / "lbl" / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match=r"empty has no non-empty text files.*lbl"):
        load_folder(tmp_path / "empty")


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    original = Path.read_bytes

    def deny(self):
        if self.name == "1.txt" and self.parent.name == "code":
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match=r"cannot read .*code/1\.txt: Permission denied"):
        load_folder(root)


def test_jsonl_loader_and_its_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello", "label": "en"}\n\n{"text": "hallo"}\n{"text": "  "}\n', encoding="utf-8")
    docs, report = load_jsonl(path)
    assert [(d.text, d.label) for d in docs] == [("hello", "en"), ("hallo", "default")]
    assert report.skipped_empty == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_jsonl(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:1: no 'text' field"):
        load_jsonl(nofield)


def test_hf_loader_reads_local_json_through_datasets(tmp_path):
    pytest.importorskip("datasets", reason="the optional 'datasets' package (moekit[data]) is not installed")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello", "label": "en"}\n{"text": "привет", "label": "ru"}\n', encoding="utf-8")
    docs, _ = load_hf("json", data_files=str(path))
    assert [(d.text, d.label) for d in docs] == [("hello", "en"), ("привет", "ru")]


def test_hf_loader_without_datasets_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"needs the 'datasets' package"):
        load_hf("imdb")


def docs_for_split(n=400):
    return [Document(f"document number {i} " * (1 + i % 3), ["a", "b"][i % 2], str(i)) for i in range(n)]


def test_split_is_deterministic_and_order_independent():
    docs = docs_for_split()
    train, val = split_documents(docs, 0.1, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.1, seed=0)
    assert sorted(d.text for d in val) == sorted(d.text for d in val2)
    assert not {d.text for d in train} & {d.text for d in val}
    assert 20 <= len(val) <= 60
    _, val3 = split_documents(docs, 0.1, seed=1)
    assert {d.text for d in val3} != {d.text for d in val}
    with pytest.raises(DataError, match="val_fraction=1.5"):
        split_documents(docs, 1.5)


def test_cap_and_chunk_bound_each_label():
    docs = docs_for_split()
    capped = cap_per_label(docs, 2000)
    for label in "ab":
        assert sum(len(d.text.encode()) for d in capped if d.label == label) <= 2000
    assert cap_per_label(docs, 2000) == capped
    long = Document("\n".join(f"line {i}" for i in range(1000)), "x", "f")
    pieces = chunk_documents([long], max_chars=500)
    assert len(pieces) > 10 and all(len(p.text) <= 510 for p in pieces)
    assert "\n".join(p.text for p in pieces) == long.text


def test_build_from_folder_and_token_arrays(tmp_path):
    root = make_folder(tmp_path / "data")
    for i in range(30):
        (root / "english" / f"extra{i}.txt").write_text(f"extra english text {i}")
    report = build_from_source(str(root), tmp_path / "cache", name="mine", val_fraction=0.2)
    assert report["labels"] == ["chinese", "code", "english", "russian"]
    assert report["per_label"]["english"]["train_docs"] + report["per_label"]["english"]["val_docs"] == 32
    assert report["documents"]["train"] + report["documents"]["val"] == 38
    data = load_tokens(tmp_path / "cache" / "mine", ByteTokenizer())
    assert data.train.tokens.shape == data.train.labels.shape
    assert int((data.train.tokens == 256).sum()) == report["documents"]["train"]
    total = sum(c["train_bytes"] for c in report["per_label"].values())
    assert len(data.train.tokens) == total + report["documents"]["train"]
    rus = data.label_names.index("russian")
    text = bytes(int(t) for t, lab in zip(data.train.tokens, data.train.labels) if lab == rus and t != 256)
    assert "Привет" in text.decode("utf-8") or "Съешь" in text.decode("utf-8")
    again = load_tokens(tmp_path / "cache" / "mine", ByteTokenizer())
    assert np.array_equal(again.val.tokens, data.val.tokens)


def test_load_tokens_of_unbuilt_corpus_says_so(tmp_path):
    with pytest.raises(DataError, match=r"not a built corpus.*moekit data build"):
        load_tokens(tmp_path, ByteTokenizer())


def test_polyglot_fallback_without_apt(tmp_path):
    report = build_polyglot(tmp_path, max_bytes_per_label=20_000, use_apt=False)
    assert report["fallback"] is True
    assert report["labels"] == ["en", "python"]
    assert any("FALLBACK" in n for n in report["notes"])
    assert all(c["train_bytes"] + c["val_bytes"] <= 20_000 + 3000 for c in report["per_label"].values())
    again = build_polyglot(tmp_path, max_bytes_per_label=20_000, use_apt=False)
    assert again["cached"] is True


def test_fetch_without_apt_reports_every_package(tmp_path, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    result = debian.fetch_debs(["fortunes-de", "fortunes-ru"], tmp_path)
    assert result.debs == {}
    assert set(result.missing) == {"fortunes-de", "fortunes-ru"}
    assert "apt-get is not available" in result.missing["fortunes-de"]


FORTUNE = "Erster Spruch.\n\t-- Jemand\n%\n\x1b[32mZweiter\x1b[m Spruch\n%\nДритте\n"
MANPAGE = '.\\" comment\n.TH TEST 1\n.SH NAME\ntest \\- macht \\fBnichts\\fR\n.PP\nEin Absatz.\n'


@pytest.fixture
def built_deb(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (not a Debian-like machine)")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: fortunes-test\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: nobody <n@example.org>\nDescription: test\n")
    fortunes = pkg / "usr/share/games/fortunes/de"
    fortunes.mkdir(parents=True)
    (fortunes / "sprueche").write_text(FORTUNE, encoding="utf-8")
    (fortunes / "sprueche.dat").write_bytes(b"\x00\x00\x00\x02")
    (fortunes / "sprueche.u8").symlink_to("sprueche")
    man = pkg / "usr/share/man/de/man1"
    man.mkdir(parents=True)
    (man / "test.1.gz").write_bytes(gzip.compress(MANPAGE.encode()))
    deb = tmp_path / "fortunes-test_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True, capture_output=True)
    return deb


def test_deb_unpack_and_parse(built_deb, tmp_path):
    root = debian.unpack_deb(built_deb, tmp_path / "unpacked")
    assert not (tmp_path / "unpacked.partial").exists()
    from moekit.data.sources import LoadReport

    docs = debian.package_documents(root, "de", LoadReport())
    texts = [d.text for d in docs]
    assert texts[:3] == ["Erster Spruch.\n\t-- Jemand", "Zweiter Spruch", "Дритте"]
    assert len(docs) == 4
    assert "test - macht nichts" in texts[3] and "Ein Absatz." in texts[3] and "comment" not in texts[3]
    assert all(d.label == "de" for d in docs)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed (not a Debian-like machine)")
def test_foreign_file_is_not_a_deb(tmp_path):
    fake = tmp_path / "x.deb"
    fake.write_bytes(b"PK\x03\x04 not a deb")
    with pytest.raises(DataError, match=r"cannot unpack .*x\.deb: dpkg-deb: error: "):
        debian.unpack_deb(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_without_dpkg_deb_every_package_is_missing(tmp_path, monkeypatch):
    """apt-get without dpkg-deb (not a real Debian system): nothing is fetched, cached .debs included,
    so the corpus build falls back instead of failing to unpack; unpack_deb names the missing tool."""
    (tmp_path / "fortunes-de_1.0_all.deb").write_bytes(b"!<arch>\n")
    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    result = debian.fetch_debs(["fortunes-de", "fortunes-ru"], tmp_path)
    assert result.debs == {}
    assert result.missing == {p: "dpkg-deb is not available on this machine (needed to unpack .deb files)"
                              for p in ("fortunes-de", "fortunes-ru")}
    with pytest.raises(DataError, match=r"cannot unpack .*fortunes-de_1\.0_all\.deb: dpkg-deb is not installed"):
        debian.unpack_deb(tmp_path / "fortunes-de_1.0_all.deb", tmp_path / "out")


def test_corpus_report_is_json_with_counts(tmp_path):
    build_from_source(str(make_folder(tmp_path / "d")), tmp_path / "c", name="n", val_fraction=0.3)
    report = json.loads((tmp_path / "c" / "n" / "report.json").read_text())
    assert set(report["per_label"]["code"]) == {"train_docs", "val_docs", "train_bytes", "val_bytes"}
