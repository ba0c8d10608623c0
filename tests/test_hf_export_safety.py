"""Exports that never mix old and new files, and checkpoint errors that name the file and the tensor.

Writers (``to_hf``, ``save_moekit``, ``convert_folder`` and ``moekit convert``) fill a temporary
folder and rename it into place; a non-empty target is refused unless ``overwrite``, which
replaces only what a previous export wrote. Readers name the shard file and the HF key for a
config that does not fit the checkpoint, a truncated shard, and a missing tensor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moekit.cli import main as cli_main  # noqa: E402
from moekit.config import ConfigError  # noqa: E402
from moekit.hf import (CheckpointError, UnsupportedArchitectureError, from_hf, load_moekit,  # noqa: E402
                       save_moekit, to_hf)
from moekit.hf.convert import INDEX_NAME, OutputFolderError, convert_folder, lm_tensors  # noqa: E402
from moekit.hf.testing import tiny_hf_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral checkpoint (per-expert w1/w3/w2 tensors, as transformers writes them)."""
    folder = tmp_path_factory.mktemp("mixtral")
    tiny_hf_model("mixtral").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(src: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two different moekit models of the same architecture (the second one's weights negated)."""
    a, b = from_hf(src), from_hf(src)
    with torch.no_grad():
        for p in b.parameters():
            p.neg_()
    return a, b


def same_weights(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    tx, ty = lm_tensors(x), lm_tensors(y)
    return sorted(tx) == sorted(ty) and all(torch.equal(tx[k], ty[k]) for k in tx)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- exports
def test_to_hf_refuses_a_previous_export_and_overwrite_replaces_it(models, tmp_path: Path) -> None:
    """The reported bug: a sharded export, then a one-file export into the same folder left the
    old shards and index beside the new file, and from_hf loaded the OLD model."""
    a, b = models
    out = tmp_path / "hf"
    to_hf(a, out, max_shard_bytes=64_000)
    sharded = files(out)
    assert INDEX_NAME in sharded and len(sharded) > 3
    with pytest.raises(OutputFolderError, match=rf"{re.escape(str(out))} is not empty .*overwrite"):
        to_hf(b, out)
    assert files(out) == sharded and same_weights(from_hf(out), a)
    to_hf(b, out, overwrite=True)
    assert files(out) == ["config.json", "model.safetensors"]
    assert same_weights(from_hf(out), b)
    assert no_temp_left(tmp_path)


def test_overwrite_refuses_files_the_export_did_not_write(models, tmp_path: Path) -> None:
    a, b = models
    out = tmp_path / "hf"
    to_hf(a, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"holds \['notes.txt'\], which this export does not write"):
        to_hf(b, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and same_weights(from_hf(out), a)
    (out / "notes.txt").unlink()
    (out / "sub").mkdir()
    with pytest.raises(OutputFolderError, match=r"\['sub'\]"):
        to_hf(b, out, overwrite=True)


def test_output_path_that_is_a_file(models, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match=r"output folder .*f exists and is not a folder"):
        to_hf(models[0], tmp_path / "f", overwrite=True)
    with pytest.raises(OutputFolderError, match="is not a folder"):
        save_moekit(models[0], tmp_path / "f")


def test_failed_export_leaves_no_folder_and_no_temp(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    calls = []

    def failing_save(tensors, path, metadata=None):  # the second shard fails, as on a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        to_hf(models[0], tmp_path / "new", max_shard_bytes=64_000)
    assert not (tmp_path / "new").exists() and no_temp_left(tmp_path)
    # Over a previous export, the failure leaves the previous export whole.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    to_hf(models[0], tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        to_hf(models[1], tmp_path / "old", max_shard_bytes=64_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert no_temp_left(tmp_path)


def test_empty_existing_folder_is_fine(models, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    to_hf(models[0], tmp_path / "empty")
    assert files(tmp_path / "empty") == ["config.json", "model.safetensors"]


def test_moekit_folders_refuse_and_overwrite_the_same_way(src: Path, models, tmp_path: Path) -> None:
    a, b = models
    out = tmp_path / "mk"
    convert_folder(src, out)
    written = files(out)
    assert {"moekit_lm.json", "model.safetensors", "hf_config.json"} <= set(written)
    with pytest.raises(OutputFolderError, match="is not empty"):
        convert_folder(src, out)
    with pytest.raises(OutputFolderError, match="is not empty"):
        save_moekit(b, out)
    save_moekit(b, out, overwrite=True)
    assert same_weights(load_moekit(out), b)
    convert_folder(src, out, overwrite=True)
    assert files(out) == written and same_weights(load_moekit(out), a)
    # An HF export is not a moekit folder: overwrite refuses its config and index.
    to_hf(a, tmp_path / "hf", max_shard_bytes=64_000)
    with pytest.raises(OutputFolderError, match=r"config.json.*which this export does not write"):
        save_moekit(a, tmp_path / "hf", overwrite=True)
    assert no_temp_left(tmp_path)


def test_cli_convert_overwrite(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mk, hf = str(tmp_path / "mk"), str(tmp_path / "hf")
    assert cli_main(["convert", "--from-hf", str(src), "--out", mk]) == 0
    assert cli_main(["convert", "--to-hf", mk, "--out", hf]) == 0
    capsys.readouterr()
    assert cli_main(["convert", "--to-hf", mk, "--out", hf]) != 0
    err = capsys.readouterr().err
    assert re.search(r"output folder .*hf is not empty .*--overwrite", err) and "Traceback" not in err
    assert cli_main(["convert", "--to-hf", mk, "--out", hf, "--overwrite"]) == 0
    assert cli_main(["convert", "--from-hf", str(src), "--out", mk, "--overwrite"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, from_hf(src)(IDS), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- errors
def _copy(folder: Path, tmp_path: Path, **config_changes: object) -> Path:
    """A copy of the checkpoint folder, with ``config_changes`` written into its config.json."""
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_config_with_fewer_experts_than_the_checkpoint(src: Path, tmp_path: Path) -> None:
    folder = _copy(src, tmp_path, num_local_experts=4)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight' in "
                                              r".*ckpt/model\.safetensors belongs to expert 4, but config\.json "
                                              r"gives 4 experts"):
        from_hf(folder)


def test_config_with_fewer_layers_than_the_checkpoint(src: Path, tmp_path: Path) -> None:
    """Extra layers were skipped silently (a truncated model); only DeepSeek-V3's MTP layers are."""
    folder = _copy(src, tmp_path, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors: tensor 'model\.layers\.2\.[\w.]+' is for "
                                              r"layer 2, but config\.json gives num_hidden_layers=2"):
        from_hf(folder)


def test_config_with_more_experts_names_the_mismatched_tensor(src: Path, tmp_path: Path) -> None:
    folder = _copy(src, tmp_path, num_local_experts=9)
    # The router's (9, D) weight no longer fits the checkpoint's (8, D).
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.block_sparse_moe\.gate\.weight' in "
                                              r".*model\.safetensors has shape \(8, 32\)"):
        from_hf(folder)


@pytest.mark.parametrize("keep,match", [
    (0.5, r"ckpt/model\.safetensors: truncated: tensor 'model\.layers\.\d\.[\w.]+' \(and \d+ more\) ends past "
          r"the end of the file \(\d+ bytes, needs \d+\)"),
    (40, r"ckpt/model\.safetensors: truncated or not a safetensors file: its header needs \d+ bytes, the file "
         r"has 40"),
    (5, r"ckpt/model\.safetensors: not a safetensors file: 5 bytes"),
])
def test_truncated_shard_names_file_and_tensor(src: Path, tmp_path: Path, keep: float, match: str) -> None:
    folder = _copy(src, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match=match):
        from_hf(folder)


def test_truncated_shard_of_an_index_and_of_a_moekit_folder(models, tmp_path: Path) -> None:
    to_hf(models[0], tmp_path / "hf", max_shard_bytes=64_000)
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)}: truncated: tensor 'model\.layers"):
        from_hf(tmp_path / "hf")
    save_moekit(models[0], tmp_path / "mk")
    path = tmp_path / "mk" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"mk/model\.safetensors: truncated: tensor '[\w.]+'"):
        load_moekit(tmp_path / "mk")


def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_the_hf_key_and_file(src: Path, tmp_path: Path) -> None:
    folder = _copy(src, tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"ckpt/model\.safetensors lacks tensor\(s\) \['{re.escape(key)}'\] "
                                              r"\(1 in all; moekit parameter\(s\) \['layers\.1\.mlp\.experts"
                                              r"\.down_proj'\]\)"):
        from_hf(folder)
    # With an index, the message names the index file.
    hf = tiny_hf_model("mixtral")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    key = "model.layers.0.self_attn.k_proj.weight"
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    _rewrite(tmp_path / "sharded" / index["weight_map"][key], lambda t: t.pop(key))
    del index["weight_map"][key]
    (tmp_path / "sharded" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"sharded/{re.escape(INDEX_NAME)} lacks tensor\(s\) "
                                              rf"\['{re.escape(key)}'\]"):
        from_hf(tmp_path / "sharded")


@pytest.mark.parametrize("text,error,match", [
    ('{"model_type": "mixtral", "hidden_size": ', CheckpointError,
     r"ckpt/config\.json: invalid JSON at line 1 column 42"),
    ('{"hidden_size": 32}', CheckpointError, r"ckpt/config\.json has no model_type"),
    ('{"model_type": "no_such_model"}', UnsupportedArchitectureError,
     r"ckpt/config\.json: model_type='no_such_model' is unknown to this transformers; whole-model conversion "
     r"supports \['mixtral'"),
])
def test_bad_config_json_names_the_file(src: Path, tmp_path: Path, text: str, error: type, match: str) -> None:
    folder = _copy(src, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(error, match=match):
        from_hf(folder)


def test_bad_moekit_hf_config_names_the_file(models, tmp_path: Path) -> None:
    save_moekit(models[0], tmp_path / "mk")
    (tmp_path / "mk" / "hf_config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"mk/hf_config\.json: invalid JSON at line 1"):
        load_moekit(tmp_path / "mk")
