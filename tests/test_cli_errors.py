"""Every command given bad input: a non-zero exit, one line on stderr naming the problem, no
traceback, and no file written (neither in the working folder nor beside the fixtures).

The cases run ``moekit.cli.main`` in-process, each in a fresh empty working folder; a few run
the real console entry point in a subprocess. The fixtures are real: a tiny corpus, dense and
MoE runs trained with paths relative to their folder, a run with a NaN expert (optimizer state
included, so ``train --resume`` reaches it), a run whose experts overflow at run time, a
Hugging Face export and damaged files.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import moe_config
from moekit.cli import main
from moekit.lm import LMConfig
from moekit.train import TrainConfig, Trainer
from moekit.train.trainer import prepare_data

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = {"en": "the cat sat on the mat. ", "de": "der Hund lief über die Straße. ", "ja": "猫が座った。"}


def _model(moe: bool, vocab: int = 257) -> LMConfig:
    return LMConfig(vocab_size=vocab, dim=16, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=16,
                    moe=moe_config(dim=16, num_experts=4, expert_hidden=8, top_k=2) if moe else None)


def _train_config(out_dir: str, moe: bool = True, **kw) -> TrainConfig:
    base = dict(corpus="tiny", data_dir="data", seq_len=16, batch_size=4, steps=2, warmup_steps=1, eval_every=100,
                eval_tokens=64, out_dir=out_dir, progress=False, tensorboard=False)
    return TrainConfig(model=_model(moe), **{**base, **kw})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The fixture folder R (see the module docstring); built once, read-only for the cases."""
    from moekit.hf.convert import save_moekit
    from moekit.hf.export import to_hf
    from moekit.recipes import save_model

    r = tmp_path_factory.mktemp("bad_input")
    corpus = r / "data" / "tiny"
    corpus.mkdir(parents=True)
    rows = [{"text": t * (3 + i % 4), "label": label, "split": "val" if i % 5 == 0 else "train"}
            for label, t in TEXTS.items() for i in range(20)]
    (corpus / "documents.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in rows) + "\n")
    (corpus / "report.json").write_text(json.dumps({"labels": sorted(TEXTS)}))
    cwd = os.getcwd()
    os.chdir(r)  # runs record relative out_dir/data_dir, as `moekit train` run from R would
    try:
        for name, moe in (("dense", False), ("moe", True)):
            cfg = _train_config(f"runs/{name}", moe)
            Trainer(cfg, prepare_data(cfg)).fit()
        cfg = _train_config("runs/nan")
        trainer = Trainer(cfg, prepare_data(cfg))
        trainer.fit()
        model = copy.deepcopy(trainer.model)
        with torch.no_grad():
            trainer.model.layers[0].mlp.experts.down_proj[1] = float("nan")
        trainer.save()
        cfg = _train_config("runs/overflow")
        overflow = copy.deepcopy(model)
        with torch.no_grad():
            for p in overflow.layers[0].mlp.experts.parameters():
                p.fill_(1e30)  # finite weights whose products overflow float32
        save_model(r / "runs" / "overflow" / "checkpoints", overflow, cfg, sorted(TEXTS))
        save_model(r / "runs" / "nocorpus" / "checkpoints", model, _train_config("runs/nocorpus", corpus="gone"))
    finally:
        os.chdir(cwd)
    good = _train_config("out").to_dict()
    good["data_dir"] = str(r / "data")
    cfgs = r / "cfg"
    cfgs.mkdir()
    (cfgs / "good.json").write_text(json.dumps(good))
    for name, change in CONFIG_VARIANTS.items():
        data = json.loads(json.dumps(good))
        for key, value in change.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
        (cfgs / f"{name}.json").write_text(json.dumps(data))
    (cfgs / "resume_nan.json").write_text(json.dumps({**good, "out_dir": str(r / "runs" / "nan"), "steps": 4}))
    (r / "notjson.json").write_text("{\"model\": ")
    (r / "list.json").write_text("[1, 2]")
    (r / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (r / "empty.safetensors").write_bytes(b"")
    (r / "garbage.safetensors").write_bytes(os.urandom(64))
    ckpt = next((r / "runs" / "moe" / "checkpoints").glob("step_*.safetensors"))
    (r / "truncated.safetensors").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(r / "foreign.safetensors"))
    (r / "afile.txt").write_text("not a folder\n")
    (r / "emptydir").mkdir()
    (r / "badlatest" / "checkpoints").mkdir(parents=True)
    (r / "badlatest" / "checkpoints" / "latest").write_text("step_00000009.safetensors")
    to_hf(model, r / "hf")
    save_moekit(model, r / "moekit_folder")
    shutil.copytree(r / "hf", r / "hf_truncated")
    shard = next((r / "hf_truncated").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    (r / "hf_badjson").mkdir()
    (r / "hf_badjson" / "config.json").write_text("{oops")
    (r / "hf_noweights").mkdir()
    shutil.copy(r / "hf" / "config.json", r / "hf_noweights" / "config.json")
    (r / "src_empty").mkdir()
    (r / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{not json\n')
    (r / "nofield.jsonl").write_text('{"body": "hello", "label": "x"}\n')
    (r / "empty.jsonl").write_text("")
    (r / "corpus_badreport").mkdir()
    (r / "corpus_badreport" / "report.json").write_text("{}")
    return r


# Train configs: the good one with one field changed (dotted keys reach into "model").
CONFIG_VARIANTS = {
    "model_null": {"model": None},
    "model_list": {"model": [1, 2]},
    "threads_neg": {"threads": -2},
    "threads_str": {"threads": "two"},
    "lr_huge": {"lr": 1e6},
    "lr_str": {"lr": "fast"},
    "lr_neg": {"lr": -0.1},
    "lr_null": {"lr": None},
    "steps_zero": {"steps": 0},
    "steps_float": {"steps": 2.5},
    "batch_str": {"batch_size": "4"},
    "seq_too_long": {"seq_len": 64},
    "warmup_neg": {"warmup_steps": -1},
    "beta1_one": {"beta1": 1.0},
    "min_lr_ratio": {"min_lr_ratio": 2.0},
    "grad_clip_neg": {"grad_clip": -1.0},
    "autocast": {"autocast": "fp8"},
    "keep_zero": {"keep_checkpoints": 0},
    "unknown_key": {"learning_rate": 0.1},
    "corpus_missing": {"corpus": "nope"},
    "corpus_empty": {"corpus": ""},
    "out_dir_null": {"out_dir": None},
    "tensorboard_str": {"tensorboard": "yes"},
    "vocab_small": {"model.vocab_size": 10},
    "dim_str": {"model.dim": "16"},
    "heads_indivisible": {"model.n_heads": 3},
    "layers_zero": {"model.n_layers": 0},
    "model_unknown": {"model.colour": "red"},
    "attention_unknown": {"model.attention": "flash9"},
    "topk_big": {"model.moe.router.top_k": 9},
    "experts_zero": {"model.moe.num_experts": 0},
    "router_unknown": {"model.moe.router.kind": "magic"},
    "moe_dim_mismatch": {"model.moe.dim": 32},
    "aux_neg": {"model.moe.balance.aux_loss_coef": -1.0},
    "capacity_zero": {"model.moe.router.capacity_factor": 0},
    "tokenizer_unknown": {"tokenizer": "klingon"},
}

# (argv, what the one stderr line must contain). R is the fixture folder, T the empty working folder.
CASES: list[tuple[str, str]] = [
    # the command line itself
    ("", r"^moekit: error: a command is required"),
    ("frobnicate", r"invalid choice: 'frobnicate'"),
    ("--bogus", r"unrecognized arguments: --bogus"),
    ("version extra", r"unrecognized arguments: extra"),
    ("eval", r"^moekit eval: error: the following arguments are required: checkpoint"),
    ("recipe", r"^moekit recipe: error: the following arguments are required: RECIPE"),
    ("data", r"the following arguments are required: ACTION"),
    ("layer-demo --router magic", r"argument --router: invalid choice: 'magic'"),
    ("layer-demo --steps -1", r"argument --steps: -1 must be >= 0"),
    ("layer-demo --seed abc", r"argument --seed: 'abc' is not an integer"),
    # data
    ("data build {R}/missing_folder --data-dir {T}/d", r"data source .*missing_folder.* is not a folder"),
    ("data build {R}/src_empty --data-dir {T}/d", r"src_empty"),
    ("data build {R}/bad.jsonl --data-dir {T}/d", r"bad\.jsonl:2"),
    ("data build {R}/nofield.jsonl --data-dir {T}/d", r"nofield\.jsonl.*text"),
    ("data build {R}/empty.jsonl --data-dir {T}/d", r"empty\.jsonl"),
    ("data build {R}/bad.jsonl --data-dir {R}/afile.txt", r"--data-dir .*afile\.txt is a file"),
    ("data build polyglot --max-bytes-per-label 0", r"argument --max-bytes-per-label: 0 must be >= 1"),
    ("data build polyglot --max-bytes-per-label lots", r"--max-bytes-per-label: 'lots' is not an integer"),
    ("data build polyglot --val-fraction 2", r"argument --val-fraction: 2 must be a finite number in \(0, 1\)"),
    ("data build polyglot --val-fraction 0", r"--val-fraction: 0 must be"),
    ("data build polyglot --val-fraction nan", r"--val-fraction: nan must be"),
    ("data build polyglot --seed -3", r"--seed: -3 must be >= 0"),
    ("data info {R}/missing", r"missing/report\.json does not exist"),
    ("data info {R}/corpus_badreport", r"corpus_badreport/report\.json is not a corpus report"),
    ("data rebuild", r"invalid choice: 'rebuild'"),
    # train: the config file
    ("train {R}/missing.json", r"config file .*missing\.json does not exist"),
    ("train {R}/notjson.json", r"notjson\.json: invalid JSON at line 1"),
    ("train {R}/list.json", r"list\.json: expected a JSON object"),
    ("train {R}/binary.json", r"cannot read config file .*binary\.json"),
    ("train {R}/emptydir", r"cannot read config file .*emptydir"),
    *[(f"train {{R}}/cfg/{name}.json", pattern) for name, pattern in {
        "model_null": r"model=None must be an LMConfig",
        "model_list": r"model=\[1, 2\] must be an LMConfig",
        "threads_neg": r"threads=-2 must be an int >= 1 or null",
        "threads_str": r"threads='two' must be an int >= 1",
        "lr_huge": r"lr=1000000.0 must be a finite number in \(0, 1\]",
        "lr_str": r"lr='fast' must be a finite number",
        "lr_neg": r"lr=-0.1 must be a finite number in \(0, 1\]",
        "lr_null": r"lr=None must be a finite number",
        "steps_zero": r"steps=0 must be an int >= 1",
        "steps_float": r"steps=2.5 must be an int >= 1",
        "batch_str": r"batch_size='4' must be an int >= 1",
        "seq_too_long": r"seq_len=64 exceeds model.max_seq_len=16",
        "warmup_neg": r"warmup_steps=-1 must be an int >= 0",
        "beta1_one": r"beta1=1.0 must be a finite number in \[0, 1\)",
        "min_lr_ratio": r"min_lr_ratio=2.0 must be a finite number in \[0, 1\]",
        "grad_clip_neg": r"grad_clip=-1.0 must be a finite number >= 0 \(0 disables clipping\)",
        "autocast": r"autocast='fp8' is not one of",
        "keep_zero": r"keep_checkpoints=0 must be an int >= 1",
        "unknown_key": r"unknown key\(s\) \['learning_rate'\]",
        "corpus_missing": r"data/nope is not a built corpus",
        "corpus_empty": r"corpus='' must be a non-empty string",
        "out_dir_null": r"out_dir=None must be a non-empty string",
        "tensorboard_str": r"tensorboard='yes' must be true or false",
        "vocab_small": r"model.vocab_size=10 is smaller than the tokenizer's",
        "dim_str": r"dim='16'",
        "heads_indivisible": r"n_heads=3",
        "layers_zero": r"n_layers=0",
        "model_unknown": r"unknown key\(s\) \['colour'\]",
        "attention_unknown": r"flash9",
        "topk_big": r"top_k=9 exceeds num_experts=4",
        "experts_zero": r"num_experts=0",
        "router_unknown": r"router.kind='magic' is not one of",
        "moe_dim_mismatch": r"dim",
        "aux_neg": r"aux_loss_coef=-1.0 must be a finite number >= 0",
        "capacity_zero": r"model: moe: router.capacity_factor=0 must be a finite number > 0 or null",
        "tokenizer_unknown": r"klingon",
    }.items()],
    # train: flags
    ("train {R}/cfg/good.json --steps 0", r"argument --steps: 0 must be >= 1"),
    ("train {R}/cfg/good.json --steps ten", r"argument --steps: 'ten' is not an integer"),
    ("train {R}/cfg/good.json --lr -1", r"argument --lr: -1 must be a finite number in \(0, inf\)"),
    ("train {R}/cfg/good.json --lr inf", r"argument --lr: inf must be a finite number"),
    ("train {R}/cfg/good.json --lr 5", r"lr=5.0 must be a finite number in \(0, 1\]"),
    ("train {R}/cfg/good.json --batch-size 0", r"argument --batch-size: 0 must be >= 1"),
    ("train {R}/cfg/good.json --seed -1", r"argument --seed: -1 must be >= 0"),
    ("train {R}/cfg/good.json --out-dir {R}/afile.txt", r"out_dir='.*afile\.txt' is a file, not a folder"),
    ("train {R}/cfg/good.json --data-dir {T}/typo", r"typo/tiny is not a built corpus"),
    ("train {R}/cfg/good.json --corpus nope", r"nope is not a built corpus"),
    ("train {R}/cfg/good.json --set lr", r"--set 'lr' is not key=value"),
    ("train {R}/cfg/good.json --set lr=fast", r"lr='fast' must be a finite number"),
    ("train {R}/cfg/good.json --set model.dim.x=1", r"--set model.dim.x: 'dim' is not a section"),
    ("train {R}/cfg/good.json --set threads=-2", r"threads=-2 must be an int >= 1"),
    ("train {R}/cfg/good.json --set model=null", r"model=None must be an LMConfig"),
    ("train {R}/cfg/good.json --set nosuch=1", r"unknown key\(s\) \['nosuch'\]"),
    ("train {R}/cfg/good.json --expert-parallel 0", r"argument --expert-parallel: 0 must be >= 1"),
    ("train {R}/cfg/good.json --dist-timeout -5", r"argument --dist-timeout: -5 must be"),
    ("train {R}/cfg/resume_nan.json --resume", r"non-finite \(NaN/Inf\) weights in layers\.0\.mlp expert 1"),
    # eval
    ("eval {R}/missing", r"checkpoint .*missing does not exist"),
    ("eval {R}/emptydir", r"emptydir holds no checkpoint"),
    ("eval {R}/afile.txt", r"afile\.txt is truncated or not a safetensors file"),
    ("eval {R}/empty.safetensors", r"empty\.safetensors is truncated or not a safetensors file"),
    ("eval {R}/garbage.safetensors", r"garbage\.safetensors is truncated or not a safetensors file"),
    ("eval {R}/truncated.safetensors", r"truncated\.safetensors"),
    ("eval {R}/foreign.safetensors", r"foreign\.safetensors is a safetensors file but not a moekit checkpoint"),
    ("eval {R}/badlatest", r"latest names 'step_00000009.safetensors', which does not exist"),
    ("eval {R}/runs/moe --tokens -5", r"argument --tokens: -5 must be >= 1"),
    ("eval {R}/runs/moe --tokens 0", r"argument --tokens: 0 must be >= 1"),
    ("eval {R}/runs/moe --tokens many", r"argument --tokens: 'many' is not an integer"),
    ("eval {R}/runs/moe --data-dir {T}/typo", r"--data-dir .*typo is not a folder"),
    ("eval {R}/runs/moe --data-dir {R}/emptydir", r"corpus 'tiny' of .* is not built \(looked in .*emptydir/tiny\)"),
    ("eval {R}/runs/nocorpus", r"corpus 'gone' of .* is not built"),
    ("eval {R}/runs/moe --mask-experts 9", r"--mask-experts: .*out of range"),
    ("eval {R}/runs/moe --mask-experts 0,1,2", r"--mask-experts: .*fewer than top_k=2"),
    ("eval {R}/runs/moe --mask-experts x,y", r"--mask-experts"),
    ("eval {R}/runs/moe --mask-experts layers.7.mlp:1", r"--mask-experts: .*layers\.7\.mlp"),
    ("eval {R}/runs/nan", r"non-finite \(NaN/Inf\) weights in layers\.0\.mlp expert 1 \(experts\.down_proj\)"),
    ("eval {R}/runs/overflow", r"^moekit eval: error: layers\.0\.mlp: expert\(s\) \[.*\] produced NaN/Inf outputs"),
    # generate
    ("generate {R}/missing", r"checkpoint .*missing does not exist"),
    ("generate {R}/runs/moe --temperature -1", r"argument --temperature: -1 must be a finite number in \[0, inf\)"),
    ("generate {R}/runs/moe --temperature nan", r"argument --temperature: nan must be"),
    ("generate {R}/runs/moe --top-p 2", r"argument --top-p: 2 must be a finite number in \(0, 1\]"),
    ("generate {R}/runs/moe --top-p 0", r"argument --top-p: 0 must be"),
    ("generate {R}/runs/moe --top-p -0.5", r"argument --top-p: -0.5 must be"),
    ("generate {R}/runs/moe --max-new-tokens -1", r"argument --max-new-tokens: -1 must be >= 1"),
    ("generate {R}/runs/moe --max-new-tokens 0", r"argument --max-new-tokens: 0 must be >= 1"),
    ("generate {R}/runs/moe --seed -1", r"argument --seed: -1 must be >= 0"),
    ("generate {R}/runs/moe --prompt " + "x" * 40, r"--prompt is 40 tokens; the model's context max_seq_len=16"),
    ("generate {R}/runs/moe --prompt " + "y" * 16, r"--prompt is 16 tokens"),
    ("generate {R}/runs/nan --prompt hi", r"layers\.0\.mlp expert 1"),
    ("generate {R}/runs/overflow --prompt hi", r"layers\.0\.mlp: expert\(s\) .* produced NaN/Inf outputs"),
    ("generate {R}/truncated.safetensors", r"truncated\.safetensors"),
    # explain and diagnose
    ("explain {R}/missing hello", r"checkpoint .*missing does not exist"),
    ("explain {R}/runs/moe ''", r"TEXT is empty"),
    ("explain {R}/runs/nan hello", r"layers\.0\.mlp expert 1"),
    ("explain {R}/runs/overflow hello", r"layers\.0\.mlp: expert\(s\)"),
    ("explain {R}/runs/moe hello --tokens 0", r"argument --tokens: 0 must be >= 1"),
    ("explain {R}/runs/moe hello --labels --data-dir {R}/emptydir", r"corpus 'tiny' .* is not built"),
    ("explain {R}/runs/nocorpus hello --labels", r"corpus 'gone' .* is not built"),
    ("explain {R}/runs/moe hello --html {T}/no/such/dir/e.html", r"--html .*e\.html: folder .* does not exist"),
    ("diagnose stability {R}/runs/moe", r"diagnose stability needs --other"),
    ("diagnose stability {R}/runs/moe --other {R}/missing", r"missing does not exist"),
    ("diagnose stability {R}/runs/moe --other {R}/runs/nan", r"layers\.0\.mlp expert 1"),
    ("diagnose expert-loss {R}/runs/nan", r"layers\.0\.mlp expert 1"),
    ("diagnose expert-loss {R}/runs/dense", r"has no MoE layers to diagnose"),
    ("diagnose latency {R}/runs/moe --repeats 0", r"argument --repeats: 0 must be >= 1"),
    ("diagnose latency {R}/runs/moe --tokens -8", r"argument --tokens: -8 must be >= 1"),
    ("diagnose expert-loss {R}/runs/nocorpus", r"corpus 'gone'"),
    ("diagnose drift {R}/runs/moe", r"invalid choice: 'drift'"),
    ("diagnose expert-loss {R}/runs/overflow", r"layers\.0\.mlp: expert\(s\)"),
    # health and mask-sweep
    ("health {R}/missing", r"checkpoint .*missing does not exist"),
    ("health {R}/runs/moe --tokens -1", r"argument --tokens: -1 must be >= 0"),
    ("health {R}/runs/moe --tokens x", r"argument --tokens: 'x' is not an integer"),
    ("health {R}/garbage.safetensors", r"garbage\.safetensors is truncated"),
    ("health {R}/runs/moe --data-dir {T}/typo", r"--data-dir .*typo is not a folder"),
    ("health {R}/runs/nocorpus", r"corpus 'gone'"),
    ("mask-sweep {R}/runs/moe --out {T}/s --max-masked -1", r"argument --max-masked: -1 must be >= 0"),
    ("mask-sweep {R}/runs/moe --out {T}/s --max-masked 3", r"--max-masked 3 is more than num_experts - top_k = 2"),
    ("mask-sweep {R}/runs/moe --out {T}/s --max-masked 99", r"--max-masked 99 is more than"),
    ("mask-sweep {R}/runs/moe --out {T}/s --repeats 0", r"argument --repeats: 0 must be >= 1"),
    ("mask-sweep {R}/runs/moe --out {T}/s --tokens 0", r"argument --tokens: 0 must be >= 1"),
    ("mask-sweep {R}/runs/moe --out {T}/s --strategy worst", r"argument --strategy: invalid choice: 'worst'"),
    ("mask-sweep {R}/runs/moe --out {R}/afile.txt", r"--out .*afile\.txt is a file, not a folder"),
    ("mask-sweep {R}/runs/nan --out {T}/s", r"layers\.0\.mlp expert 1"),
    ("mask-sweep {R}/runs/dense --out {T}/s", r"has no MoE layers to mask"),
    ("mask-sweep {R}/runs/moe", r"the following arguments are required: --out"),
    ("mask-sweep {R}/runs/overflow --out {T}/s", r"layers\.0\.mlp: expert\(s\)"),
    # recipes
    ("recipe upcycle {R}/missing --out {T}/u", r"checkpoint .*missing does not exist"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --experts 0", r"argument --experts: 0 must be >= 1"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --top-k 0", r"argument --top-k: 0 must be >= 1"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --experts 2 --top-k 3", r"top_k=3 exceeds num_experts=2"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --noise -1", r"argument --noise: -1 must be"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --steps -1", r"argument --steps: -1 must be >= 0"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --lr 0", r"argument --lr: 0 must be"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --layers a,b", r"'a,b' is not a comma-separated list of expert ids"),
    ("recipe upcycle {R}/runs/dense --out {R}/afile.txt", r"--out .*afile\.txt is a file, not a folder"),
    ("recipe upcycle {R}/runs/nan --out {T}/u", r"layers\.0\.mlp expert 1"),
    ("recipe upcycle {R}/runs/dense --out {T}/u --data-dir {T}/typo", r"--data-dir .*typo is not a folder"),
    ("recipe upcycle {R}/runs/dense", r"the following arguments are required: --out"),
    ("recipe btx {R}/runs/dense --out {T}/b", r"the following arguments are required: --group"),
    ("recipe btx {R}/runs/dense --out {T}/b --group en --group xx", r"labels \['xx'\] are not in the corpus"),
    ("recipe btx {R}/runs/dense --out {T}/b --group en --branch-steps 0", r"argument --branch-steps: 0 must be >= 1"),
    ("recipe btx {R}/runs/dense --out {T}/b --group en --finetune some", r"argument --finetune: invalid choice"),
    ("recipe btx {R}/runs/nan --out {T}/b --group en --group de", r"layers\.0\.mlp expert 1"),
    ("recipe supervised {R}/runs/moe --out {T}/s --coef -1", r"argument --coef: -1 must be"),
    ("recipe supervised {R}/runs/moe --out {T}/s --steps 0", r"argument --steps: 0 must be >= 1"),
    ("recipe supervised {R}/runs/nan --out {T}/s", r"layers\.0\.mlp expert 1"),
    ("recipe finetune-experts {R}/runs/moe --out {T}/f --experts a,b", r"'a,b' is not a comma-separated list"),
    ("recipe finetune-experts {R}/runs/moe --out {T}/f --experts x:1", r"block 'x' is not a block number"),
    ("recipe finetune-experts {R}/runs/moe --out {T}/f --experts 1 --experts 0:1", r"not both"),
    ("recipe finetune-experts {R}/runs/moe --out {T}/f --experts 1 --steps 0", r"argument --steps: 0 must be >= 1"),
    ("recipe finetune-experts {R}/runs/nan --out {T}/f --experts 1", r"layers\.0\.mlp expert 1"),
    ("recipe surgery {R}/runs/moe remove --experts 9 --out {T}/x", r"out of range"),
    ("recipe surgery {R}/runs/moe remove --experts 0,1,2,3 --out {T}/x",
     r"removing leaves 0 experts, fewer than top_k=2"),
    ("recipe surgery {R}/runs/moe add --n 0 --out {T}/x", r"argument --n: 0 must be >= 1"),
    ("recipe surgery {R}/runs/moe add --noise -2 --out {T}/x", r"argument --noise: -2 must be"),
    ("recipe surgery {R}/runs/moe split --out {T}/x", r"argument action: invalid choice: 'split'"),
    ("recipe surgery {R}/runs/moe merge --groups 0+9 --out {T}/x", r"9"),
    ("recipe surgery {R}/runs/nan remove --experts 1 --out {T}/x", r"layers\.0\.mlp expert 1"),
    ("recipe surgery {R}/runs/dense remove --experts 1 --out {T}/x", r"MoE"),
    ("recipe distill {R}/runs/moe --out {T}/x", r"invalid choice: 'distill'"),
    # convert
    ("convert --from-hf {R}/missing --out {T}/c", r"checkpoint folder .*missing does not exist"),
    ("convert --from-hf {R}/emptydir --out {T}/c", r"emptydir"),
    ("convert --from-hf {R}/hf_badjson --out {T}/c", r"hf_badjson"),
    ("convert --from-hf {R}/hf_noweights --out {T}/c", r"hf_noweights"),
    ("convert --from-hf {R}/hf_truncated --out {T}/c", r"hf_truncated"),
    ("convert --from-hf {R}/hf --out {R}/afile.txt", r"afile\.txt"),
    ("convert --from-hf {R}/hf --out {T}/c --dtype int8", r"argument --dtype: invalid choice: 'int8'"),
    ("convert --to-hf {R}/missing --out {T}/c", r"missing"),
    ("convert --to-hf {R}/emptydir --out {T}/c", r"emptydir"),
    ("convert --to-hf {R}/moekit_folder --out {T}/c --family nosuchfamily", r"nosuchfamily"),
    ("convert --to-hf {R}/hf --out {T}/c", r"hf/moekit_lm\.json does not exist"),
    ("convert --from-hf {R}/hf --to-hf {R}/hf --out {T}/c", r"not allowed with argument"),
    ("convert --out {T}/c", r"one of the arguments --from-hf --to-hf is required"),
    ("convert --from-hf {R}/hf", r"the following arguments are required: --out"),
    # demo
    ("demo --size huge", r"argument --size: invalid choice: 'huge'"),
    ("demo --size tiny --steps 0", r"argument --steps: 0 must be >= 1"),
    ("demo --size tiny --top-k 0", r"argument --top-k: 0 must be >= 1"),
    ("demo --size tiny --num-experts 0", r"argument --num-experts: 0 must be >= 1"),
    ("demo --size tiny --num-experts 2 --top-k 4 --shared-experts 0 --out-dir {T}/d", r"--top-k 4 exceeds --num-experts 2"),
    ("demo --size tiny --top-k 4 --out-dir {T}/d", r"--top-k 4 \+ --shared-experts 1 = 5 does not divide ffn_hidden=64"),
    ("demo --size tiny --corpus {R}/missing.jsonl --out-dir {T}/d", r"missing\.jsonl"),
    ("demo --size tiny --threads 0", r"argument --threads: 0 must be >= 1"),
    ("demo --size tiny --aux-loss-coef -1", r"argument --aux-loss-coef: -1 must be"),
    ("demo --size tiny --out-dir {R}/afile.txt", r"--out-dir .*afile\.txt is a file, not a folder"),
    ("demo --size tiny --out-dir {R}/runs", r"--out-dir .*runs holds files that are not a demo's"),
    ("demo --size tiny --out-dir {T}/d --data-dir {R}/afile.txt", r"--data-dir .*afile\.txt is a file"),
    # serve
    ("serve {R}/missing", r"checkpoint .*missing does not exist"),
    ("serve {R}/garbage.safetensors", r"garbage\.safetensors is truncated"),
    ("serve {R}/runs/moe --port -1", r"argument --port: -1 must be >= 0 and <= 65535"),
    ("serve {R}/runs/moe --port 70000", r"argument --port: 70000 must be >= 0 and <= 65535"),
    ("serve {R}/runs/moe --max-batch 0", r"argument --max-batch: 0 must be >= 1"),
    ("serve {R}/runs/moe --queue-size 0", r"argument --queue-size: 0 must be >= 1"),
    ("serve {R}/runs/moe --max-tokens -5", r"argument --max-tokens: -5 must be >= 1"),
    ("serve {R}/runs/moe --log-level loud", r"argument --log-level: invalid choice: 'loud'"),
    ("serve {R}/runs/moe --threads 0", r"argument --threads: 0 must be >= 1"),
]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("template,pattern", CASES, ids=[c[0][:60] or "(none)" for c in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(template, pattern, root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [a.replace("{R}", str(root)).replace("{T}", str(work)) for a in shlex.split(template)]
    before = _files(root)
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None), f"exit status {code}; stderr {err!r}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("moekit"), f"stderr is not one line: {err!r}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    assert _files(work) == set(), f"files written in the working folder: {sorted(_files(work))}"
    assert _files(root) == before, f"files written beside the fixtures: {sorted(_files(root) - before)}"


def test_at_least_150_cases():
    assert len(CASES) >= 150


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_bad_input_through_a_real_process(root, tmp_path):
    """The console entry point: exit status 2, one line on stderr, no traceback."""
    for args, pattern in [(["train", str(root / "cfg" / "model_null.json")], r"model=None must be an LMConfig"),
                          (["eval", str(root / "runs" / "nan")], r"layers\.0\.mlp expert 1"),
                          ([], r"^moekit: error: a command is required")]:
        proc = _cli(args, tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert re.search(pattern, lines[-1]), proc.stderr
        assert len(lines) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_version_flag(capsys):
    from moekit import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"moekit {__version__}"


def test_eval_finds_the_corpus_relative_to_the_run_and_builds_nothing(root, tmp_path, monkeypatch, capsys):
    """A run trained with data_dir="data" in R is evaluated from another folder: the corpus is
    found at R/data (not ./data), and nothing is downloaded or written."""
    monkeypatch.chdir(tmp_path)
    before = _files(root)
    assert main(["eval", str(root / "runs" / "moe"), "--tokens", "32"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and _files(root) == before


def test_health_still_reports_a_nan_expert(root, tmp_path, monkeypatch, capsys):
    """health is the one command that loads a corrupt run: it reports it and exits 1."""
    monkeypatch.chdir(tmp_path)
    assert main(["health", str(root / "runs" / "nan"), "--tokens", "32"]) == 1
    assert "corrupt weights: layers.0.mlp expert 1 in experts.down_proj" in capsys.readouterr().out


def test_runtime_nonfinite_error_names_the_module_path(root):
    from moekit.layer import ExpertNonFiniteError
    from moekit.train.trainer import load_trained

    model, _, _ = load_trained(root / "runs" / "overflow")
    with pytest.raises(ExpertNonFiniteError, match=r"^layers\.0\.mlp: expert\(s\)"):
        model(torch.randint(0, 257, (1, 8)))


@pytest.mark.slow
def test_data_build_hf_offline_is_one_line(tmp_path):
    proc = _cli(["data", "build", "hf:nosuch/dataset", "--data-dir", "d"], tmp_path,
                env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and re.search(r"cannot load Hugging Face dataset 'nosuch/dataset'", lines[0]), proc.stderr


def test_missing_optional_package_names_its_extra(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ModuleNotFoundError
    code, err = _run(["convert", "--from-hf", str(root / "hf"), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert re.match(r"moekit convert: error: .*transformers.*pip install 'moekit\[hf\]'", err), err
    assert list(tmp_path.iterdir()) == []
    from moekit.cli import one_line

    missing = ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
    assert one_line(missing) == "uvicorn is not installed; this needs pip install 'moekit[serve]'"
    assert one_line(ValueError("two\n  lines")) == "two lines"


def test_training_without_tensorboard_notes_it_once(root, tmp_path, monkeypatch, capsys):
    from moekit.report.optional import note_missing

    note_missing.cache_clear()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.chdir(root)
    cfg = _train_config(str(tmp_path / "run"), tensorboard=True, steps=1)
    Trainer(cfg, prepare_data(cfg)).fit()
    Trainer(cfg, prepare_data(cfg)).fit(steps=2)
    err = capsys.readouterr().err
    assert err.count("note: TensorBoard logging skipped: tensorboard is not installed (pip install "
                     "'moekit[train]')") == 1
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()
    note_missing.cache_clear()
