"""The one config base (moekit.config_base): checks from annotations and specs, unknown keys with the
closest known one, JSON files (missing, bad JSON, wrong values, atomic writes), --set overrides, and
the four configs built on it (MoEConfig, LMConfig, TrainConfig, ServeLimits)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from moekit import ConfigError, moe_config
from moekit.config_base import Config, apply_overrides, check, read_json, spec
from moekit.lm.config import LMConfig
from moekit.serve.engine import ServeLimits
from moekit.train.config import TrainConfig


@dataclass
class Inner(Config):
    section = "inner"

    k: int = spec(2, ge=1)
    mode: Literal["a", "b"] = "a"

    def validate(self) -> None:
        check(self.mode == "a" or self.k == 1, f"inner.mode={self.mode!r} needs inner.k=1, got {self.k}")


@dataclass
class Sub(Config):
    width: int = spec(ge=1)
    depth: int = 1


@dataclass
class Toy(Config):
    n: int = spec(1, ge=1)
    rate: float = spec(0.5, gt=0, le=1)
    frac: float = spec(0.0, ge=0, lt=1)
    flag: bool = False
    name: str = spec("x", nonempty=True)
    limit: int | None = spec(None, ge=0, hint="null: no limit")
    kind: str = spec("p", choices=("p", "q"))
    shape: tuple[int, ...] = (1, 2)
    pair: tuple[int, float] = (1, 0.5)
    ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    sub: Sub | None = None
    token: str | None = spec(None, secret=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"^n=0 must be an int >= 1$"),
    ({"n": True}, r"^n=True must be an int >= 1$"),
    ({"n": 2.0}, r"^n=2.0 must be an int >= 1$"),
    ({"rate": 0}, r"^rate=0 must be a finite number in \(0, 1\]$"),
    ({"rate": 1.5}, r"^rate=1.5 must be a finite number in \(0, 1\]$"),
    ({"rate": float("nan")}, r"^rate=nan must be a finite number in \(0, 1\]$"),
    ({"rate": "0.5"}, r"^rate='0.5' must be a finite number in \(0, 1\]$"),
    ({"frac": 1.0}, r"^frac=1.0 must be a finite number in \[0, 1\)$"),
    ({"flag": 1}, r"^flag=1 must be true or false$"),
    ({"name": ""}, r"^name='' must be a non-empty string$"),
    ({"name": 3}, r"^name=3 must be a non-empty string$"),
    ({"limit": -1}, r"^limit=-1 must be an int >= 0 or null \(null: no limit\)$"),
    ({"kind": "r"}, r"^kind='r' is not one of \['p', 'q'\]$"),
    ({"shape": (1, "2")}, r"^shape=\(1, '2'\) must be a list of ints$"),
    ({"pair": (1,)}, r"^pair=\(1,\) must be a list of 2 values$"),
    ({"ids": [0, None]}, r"^ids=\[0, None\] must be a list of ints$"),
    ({"extra": {1: 2}}, r"^extra=\{1: 2\} must be a dict with string keys$"),
    ({"inner": 3}, r"^inner=3 must be an Inner or a dict of its fields$"),
    ({"inner": {"k": 0}}, r"^inner\.k=0 must be an int >= 1$"),
    ({"inner": {"mode": "c"}}, r"^inner\.mode='c' is not one of \['a', 'b'\]$"),
    ({"inner": {"mode": "b"}}, r"^inner\.mode='b' needs inner\.k=1, got 2$"),
    ({"inner": {"kk": 1}}, r"^unknown key\(s\) \['kk'\] in inner \(did you mean 'k'\?\); known: \['k', 'mode'\]$"),
    ({"sub": {"width": 0}}, r"^sub: width=0 must be an int >= 1$"),
    ({"sub": {}}, r"^sub is missing required key\(s\) \['width'\]$"),
])
def test_fields_are_checked_from_annotations_and_specs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Toy(**kwargs)


def test_good_values_and_bounds_are_accepted():
    toy = Toy(n=1, rate=1, frac=0.0, limit=0, kind="q", shape=[3], ids=[1, 2], extra={"a": [1]},
              inner={"k": 1, "mode": "b"}, sub={"width": 4}, token="s3cret")
    assert toy.rate == 1 and toy.limit == 0 and toy.shape == (3,)  # a JSON list becomes the annotated tuple
    assert toy.inner == Inner(k=1, mode="b") and toy.sub == Sub(width=4)


def test_error_names_class_field_and_value_and_hides_secrets():
    with pytest.raises(ConfigError) as info:
        Toy(inner={"k": -3})
    err = info.value
    assert isinstance(err, ValueError) and (err.config, err.field, err.value) == ("Inner", "k", -3)
    with pytest.raises(ConfigError) as info:
        Toy(token=12345678)
    assert str(info.value) == "token must be a string or null" and "12345678" not in str(info.value)
    assert info.value.config == "Toy" and info.value.field == "token"
    with pytest.raises(ConfigError) as info:  # a cross-field check gets the class too
        Inner(k=2, mode="b")
    assert info.value.config == "Inner"


def test_unknown_keys_name_the_closest_known_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rat'\] in Toy \(did you mean 'rate'\?\)"):
        Toy.from_dict({"rat": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fleg', 'nn'\] in cfg\.json "
                                          r"\(did you mean 'flag' for 'fleg', 'n' for 'nn'\?\)"):
        Toy.from_dict({"nn": 2, "fleg": True}, where="cfg.json")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['zzz'\] in Toy; known: \["):
        Toy.from_dict({"zzz": 1})
    with pytest.raises(ConfigError, match=r"unknown MoE option\(s\) \['num_expert'\] \(did you mean 'num_experts'\?\)"):
        moe_config(dim=8, num_expert=4, expert_hidden=8)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_head'\] in LMConfig \(did you mean 'n_heads'\?\)"):
        LMConfig.from_dict({"n_head": 4})


def test_round_trip_and_atomic_save(tmp_path, monkeypatch):
    toy = Toy(shape=(4, 5), pair=(2, 1.5), ids=[3], extra={"w": 1}, sub=Sub(width=2), limit=7)
    path = tmp_path / "toy.json"
    toy.save(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(dataclasses.asdict(toy)))
    assert Toy.load(path) == toy and Toy.from_dict(toy.to_dict()) == toy
    # A write that fails before the rename leaves the old file whole and no temporary file behind.
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ConfigError, match=r"cannot write config file .*toy\.json: No space left on device"):
        Toy(n=9).save(path)
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["toy.json"]
    with pytest.raises(ConfigError, match=r"cannot write config file .*nofolder.*toy\.json"):
        toy.save(tmp_path / "nofolder" / "toy.json")


def test_load_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file .*absent\.json does not exist$"):
        Toy.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "n": 2,\n  "rate": .5\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 3 column 11: Expecting value$"):
        Toy.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"bad\.json: expected a JSON object, got list$"):
        Toy.load(bad)
    bad.write_text('{"inner": {"k": "2"}}')
    with pytest.raises(ConfigError, match=r"^.*bad\.json: inner\.k='2' must be an int >= 1$"):
        Toy.load(bad)
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match=r"cannot read config file .*bad\.json"):
        Toy.load(bad)
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        read_json(tmp_path)


def test_set_overrides_dotted_keys_json_then_string():
    data = apply_overrides({"n": 1, "sub": None}, ["rate=0.25", "name=plain text", "limit=null", "ids=[1, 2]",
                                                   "inner.mode=b", "inner.k=1", "sub.width=3", "extra.a.b=1"], Toy)
    assert data == {"n": 1, "rate": 0.25, "name": "plain text", "limit": None, "ids": [1, 2],
                    "inner": {"mode": "b", "k": 1}, "sub": {"width": 3}, "extra": {"a": {"b": 1}}}
    toy = Toy.from_dict(data)
    assert toy.override(["inner.k=1", "inner.mode=a"]).inner == Inner(k=1, mode="a")
    with pytest.raises(ConfigError, match=r"^--set 'rate' is not key=value$"):
        apply_overrides({}, ["rate"], Toy)
    with pytest.raises(ConfigError, match=r"^--set inner\.kk=1: unknown key\(s\) \['kk'\] in inner "
                                          r"\(did you mean 'k'\?\)"):
        apply_overrides({}, ["inner.kk=1"], Toy)
    with pytest.raises(ConfigError, match=r"^--set n\.x: 'n' is not a section of the config$"):
        apply_overrides({}, ["n.x=1"], Toy)
    with pytest.raises(ConfigError, match=r"^--set n\.x: 'n' is not a section of the config$"):
        apply_overrides({"n": 1}, ["n.x=1"])  # without the class: the data decides
    with pytest.raises(ConfigError, match=r"^rate='fast' must be a finite number"):
        toy.override(["rate=fast"])


def test_train_config_load_with_overrides(tmp_path):
    path = tmp_path / "train.json"
    TrainConfig().save(path)
    cfg = TrainConfig.load(path, overrides=["lr=0.01", "model.moe_layers=null", "model.dim=128"])
    assert cfg.lr == 0.01 and cfg.model.dim == 128
    with pytest.raises(ConfigError, match=r"--set model\.dimm=1: unknown key\(s\) \['dimm'\] in model "
                                          r"\(did you mean 'dim'\?\)"):
        TrainConfig.load(path, overrides=["model.dimm=1"])
    with pytest.raises(ConfigError, match=r"train\.json: model: moe: router\.top_k=9 exceeds num_experts=4"):
        TrainConfig.load(path, overrides=['model.moe={"dim": 256, "num_experts": 4, "expert_hidden": 8}',
                                          "model.moe.router.top_k=9"])


def _four() -> list[Config]:
    moe = moe_config(dim=16, num_experts=4, expert_hidden=8, capacity_factor=1.5, shared_experts=1)
    lm = LMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32, moe=moe,
                  moe_layers=[1], attention_options={"sliding_window": 8})
    return [moe, lm, TrainConfig(model=lm, seq_len=16, threads=2), ServeLimits(max_batch=3, admin_token="a" * 12)]


@pytest.mark.parametrize("index", range(4), ids=["MoEConfig", "LMConfig", "TrainConfig", "ServeLimits"])
def test_every_config_shares_the_base(tmp_path, index):
    cfg = _four()[index]
    cls = type(cfg)
    assert isinstance(cfg, Config)
    for name in ("from_dict", "to_dict", "save", "load", "__post_init__"):  # one implementation, in the base
        assert name not in vars(cls), f"{cls.__name__} defines its own {name}"
    path = tmp_path / "cfg.json"
    cfg.save(path)
    assert json.loads(path.read_text()) == dataclasses.asdict(cfg)  # the file format the old loaders read
    assert cls.load(path) == cfg
    with pytest.raises(ConfigError, match=r"^config file .*missing\.json does not exist$"):
        cls.load(tmp_path / "missing.json")
    path.write_text('{"a": 1,}')
    with pytest.raises(ConfigError, match=r"cfg\.json: invalid JSON at line 1 column 9"):
        cls.load(path)
    first_int = next(f.name for f in dataclasses.fields(cls) if f.type in ("int", int))
    path.write_text(json.dumps({**cfg.to_dict(), first_int: "x"}))
    with pytest.raises(ConfigError, match=rf"cfg\.json: (ServeLimits\.)?{first_int}='x' must be an int >= 1$"):
        cls.load(path)


def test_no_copied_checks_left():
    root = Path(__file__).resolve().parents[1] / "moekit"
    for rel in ("config.py", "lm/config.py", "train/config.py", "serve/engine.py"):
        text = (root / rel).read_text(encoding="utf-8")
        assert not re.search(r"^def _check\b", text, re.M), f"moekit/{rel} defines its own _check"
        assert "json.dumps" not in text and "json.loads" not in text, f"moekit/{rel} reads or writes JSON itself"


def test_base_imports_only_errors_from_moekit():
    path = Path(__file__).resolve().parents[1] / "moekit" / "config_base.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    local = {name for name in imported if name.startswith(".") or name.startswith("moekit")}
    assert local == {".errors"}, local
