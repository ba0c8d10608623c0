"""`moekit recipe ...`: sparse upcycling, Branch-Train-MiX, supervised routing, selective expert
fine-tuning, LoRA adapters and expert surgery on checkpoints (see docs/recipes.md)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import NONNEGATIVE_INT, NONNEGATIVE_NUMBER, POSITIVE_INT, POSITIVE_NUMBER, load_run


def recipe_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad expert ids and labels in recipe arguments (the KeyError and IndexError of the recipes)
    become ConfigErrors, which ``moekit.cli.main`` prints as one line."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from ..config import ConfigError

        try:
            return run(args)
        except (KeyError, IndexError) as err:
            raise ConfigError(err.args[0] if err.args else type(err).__name__) from None

    return wrapper


def _load(args: argparse.Namespace, path: str) -> tuple[Any, Any, Any]:
    """(model, TrainConfig with --data-dir/--lr/--out overrides, TokenData) of a checkpoint."""
    from ..config import ConfigError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    loaded = load_run(path, getattr(args, "data_dir", None))
    data = loaded.data()
    changes: dict[str, Any] = {"progress": True, "tensorboard": False, "out_dir": args.out}
    if getattr(args, "lr", None):
        changes["lr"] = args.lr
    cfg = dataclasses.replace(loaded.cfg, **changes)
    return loaded.model, cfg, data


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of expert ids") from None


def _experts_arg(specs: list[str]) -> list[int] | dict[int, list[int]]:
    """``["1,2"]`` -> the same ids in every MoE block; ``["0:1,2", "2:3"]`` -> {block: ids}."""
    per_block: dict[int, list[int]] = {}
    everywhere: list[int] = []
    for spec in specs:
        block, sep, ids = spec.rpartition(":")
        if sep:
            if not block.isdigit():
                raise ValueError(f"--experts {spec!r}: block {block!r} is not a block number")
            per_block.setdefault(int(block), []).extend(_ids(ids))
        else:
            everywhere.extend(_ids(ids))
    if per_block and everywhere:
        raise ValueError("--experts: give ids for every block or per block (BLOCK:ids), not both")
    return per_block or everywhere


def _print_eval(title: str, ev: dict[str, Any]) -> None:
    per_label = ", ".join(f"{k} {v:.3f}" for k, v in ev["per_label"].items())
    print(f"{title}: validation loss {ev['loss']:.4f}; {per_label}")


@recipe_errors
def run_upcycle(args: argparse.Namespace) -> int:
    from ..recipes import save_model, upcycle
    from ..train.trainer import Trainer

    dense, cfg, data = _load(args, args.checkpoint)
    layers = _ids(args.layers) if args.layers else None
    model = upcycle(dense, args.experts, args.top_k, noise=args.noise, moe_layers=layers, seed=cfg.seed,
                    aux_loss_coef=args.aux_loss_coef)
    cfg = dataclasses.replace(cfg, model=model.config, steps=max(args.steps, 1))
    if args.steps == 0:
        path = save_model(Path(cfg.out_dir) / "checkpoints", model, cfg, data.label_names, {"recipe": "upcycle"})
        print(f"upcycled model saved to {path}")
        return 0
    trainer = Trainer(cfg, data, model=model)
    trainer.fit()
    _print_eval(f"upcycled, after {trainer.step} steps", trainer.evals[-1])
    return 0


@recipe_errors
def run_btx(args: argparse.Namespace) -> int:
    from ..recipes import btx, save_model

    seed, cfg, data = _load(args, args.checkpoint)
    groups = [[label for label in g.split(",") if label] for g in args.group]
    model, record = btx(seed, cfg, data, groups, args.branch_steps, args.mix_steps, finetune=args.finetune,
                        top_k=args.top_k)
    path = save_model(Path(cfg.out_dir) / "checkpoints", model, cfg, data.label_names, {"recipe": "btx"})
    (Path(cfg.out_dir) / "btx.json").write_text(json.dumps(record, indent=2))
    _print_eval("BTX mixed model", record["mix"])
    print(f"saved {path}")
    return 0


@recipe_errors
def run_supervised(args: argparse.Namespace) -> int:
    from ..recipes import LabelRoutingLoss, routing_purity
    from ..train.trainer import Trainer

    model, cfg, data = _load(args, args.checkpoint)
    cfg = dataclasses.replace(cfg, steps=args.steps)
    trainer = Trainer(cfg, data, model=model)
    loss = LabelRoutingLoss(model, args.coef)
    trainer.add_loss("route", loss)
    trainer.fit()
    loss.close()
    ev = trainer.evals[-1]
    _print_eval("supervised routing", ev)
    for layer, counts in ev.get("routing_by_label", {}).items():
        print(f"  {layer}: routing purity {routing_purity(counts)['purity']:.3f}")
    return 0


@recipe_errors
def run_finetune(args: argparse.Namespace) -> int:
    from ..recipes import filter_labels, finetune_experts

    model, cfg, data = _load(args, args.checkpoint)
    if args.labels:
        data = filter_labels(data, args.labels.split(","))
    trainer = finetune_experts(model, cfg, data, _experts_arg(args.experts), train_router=args.router,
                               steps=args.steps)
    _print_eval("after selective fine-tuning", trainer.evals[-1])
    return 0


@recipe_errors
def run_lora(args: argparse.Namespace) -> int:
    from ..adapters import LoraConfig
    from ..config import ConfigError
    from ..hf.convert import MOEKIT_CONFIG
    from ..recipes.lora import lora_finetune, lora_summary, text_data

    source = Path(args.checkpoint)
    attention = [n for n in args.attention.split(",") if n]
    experts = _experts_arg(args.experts) if args.experts else None
    if isinstance(experts, dict):
        experts = {f"layers.{block}.mlp": ids for block, ids in experts.items()}
    lora = LoraConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank, experts=not args.no_experts,
                      expert_mode="shared" if args.shared else "per_expert", expert_ids=experts,
                      router=args.router, attention=attention)
    run_folder = (source / "checkpoints").is_dir()  # a training run also holds a config.json
    if source.is_dir() and ((source / MOEKIT_CONFIG).is_file() or ((source / "config.json").is_file() and not run_folder)):
        from ..serve.server import load_model
        from ..train.trainer import TrainConfig

        if args.text is None:
            raise ConfigError(f"{source} is a model folder: name the training text with --text FILE")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        model, tok, _ = load_model(source)
        seq_len = min(args.seq_len, model.config.max_seq_len)
        text = Path(args.text)
        if not text.is_file():
            raise ConfigError(f"--text {text} is not a file")
        data = text_data(text.read_text(encoding="utf-8"), tok, seq_len, source=str(text))
        cfg = TrainConfig(model=model.config, seq_len=seq_len, batch_size=args.batch_size, steps=args.steps,
                          lr=args.lr or 1e-3, warmup_steps=min(10, args.steps), eval_every=args.steps,
                          eval_tokens=min(8192, len(data.val.tokens)), ckpt_every=args.steps,
                          out_dir=str(out), tokenizer=str(source), tensorboard=False, progress=True)
    else:
        if args.text is not None:
            raise ConfigError("--text is for model folders; a training run fine-tunes on its own corpus")
        model, cfg, data = _load(args, args.checkpoint)
        if args.labels:
            from ..recipes import filter_labels

            data = filter_labels(data, args.labels.split(","))
    trainer, path = lora_finetune(model, cfg, data, lora, steps=args.steps)
    info = lora_summary(trainer.model)
    print(f"LoRA: {info['adapter_params']:,} adapter parameters ({100 * info['fraction']:.2f}% of "
          f"{info['base_params']:,}); validation loss {trainer.evals[0]['loss']:.4f} -> {trainer.evals[-1]['loss']:.4f}")
    print(f"adapter saved to {path}; serve it with: moekit serve {source} --adapter {path}")
    return 0


@recipe_errors
def run_surgery(args: argparse.Namespace) -> int:
    from ..recipes import add_experts, merge_experts, remove_experts, save_model
    from ..train.trainer import eval_batches

    model, cfg, data = _load(args, args.checkpoint)
    if args.action == "add":
        calib = eval_batches(data.val, 8, cfg.seq_len, 8 * cfg.seq_len)[0].input_ids
        new = add_experts(model, args.n, noise=args.noise, calibration=calib,
                          bias_update_rate=args.bias_update_rate)
    elif args.action == "remove":
        new = remove_experts(model, _experts_arg(args.experts))
    else:
        groups = [_ids(g.replace("+", ",")) for g in args.groups]
        new = merge_experts(model, groups)
    path = save_model(Path(cfg.out_dir) / "checkpoints", new, cfg, data.label_names,
                      {"recipe": f"surgery-{args.action}"})
    print(f"{args.action}: {model.config.moe.num_experts} -> {new.config.moe.num_experts} experts per MoE layer; "
          f"saved {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recipe", help="upcycle, BTX, supervised routing, selective fine-tuning, LoRA, surgery")
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)

    def common(q: argparse.ArgumentParser, train: bool = True) -> None:
        q.add_argument("checkpoint", help="checkpoint file or run folder")
        q.add_argument("--out", required=True, help="output run folder")
        q.add_argument("--data-dir", dest="data_dir")
        if train:
            q.add_argument("--lr", type=POSITIVE_NUMBER)

    q = sub.add_parser("upcycle", help="dense checkpoint -> MoE (Komatsuzaki et al. 2022), then continue training")
    common(q)
    q.add_argument("--experts", type=POSITIVE_INT, default=8)
    q.add_argument("--top-k", type=POSITIVE_INT, default=2)
    q.add_argument("--noise", type=NONNEGATIVE_NUMBER, default=0.0, help="relative noise on each expert copy")
    q.add_argument("--layers", default="", help="blocks to upcycle, e.g. 1,3 (default all)")
    q.add_argument("--aux-loss-coef", type=NONNEGATIVE_NUMBER, default=0.01)
    q.add_argument("--steps", type=NONNEGATIVE_INT, default=200, help="training steps after upcycling (0: just save)")
    q.set_defaults(func=run_upcycle)

    q = sub.add_parser("btx", help="Branch-Train-MiX (Sukhbaatar et al. 2024) from a dense seed checkpoint")
    common(q)
    q.add_argument("--group", action="append", required=True, help="labels of one branch, e.g. de,fr (repeat)")
    q.add_argument("--branch-steps", type=POSITIVE_INT, default=100)
    q.add_argument("--mix-steps", type=POSITIVE_INT, default=50)
    q.add_argument("--finetune", choices=["router", "all", "none"], default="router")
    q.add_argument("--top-k", type=POSITIVE_INT, default=2)
    q.set_defaults(func=run_btx)

    q = sub.add_parser("supervised", help="continue training with the label-routing auxiliary loss")
    common(q)
    q.add_argument("--coef", type=NONNEGATIVE_NUMBER, default=0.1)
    q.add_argument("--steps", type=POSITIVE_INT, default=100)
    q.set_defaults(func=run_supervised)

    q = sub.add_parser("finetune-experts", help="fine-tune only chosen experts (others stay bit-identical)")
    common(q)
    q.add_argument("--experts", action="append", required=True, metavar="[BLOCK:]IDS",
                   help="experts to train: '1,3' in every MoE block or '2:1,3' for block 2 (repeatable)")
    q.add_argument("--labels", default="", help="train only on these labels, e.g. fr,it")
    q.add_argument("--router", action="store_true", help="train the routers too")
    q.add_argument("--steps", type=POSITIVE_INT, default=50)
    q.set_defaults(func=run_finetune)

    q = sub.add_parser("lora", help="LoRA adapters on experts/router/attention of a run or converted HF folder")
    common(q)
    q.add_argument("--text", default=None, help="training text (UTF-8 file) for a model folder; a run uses its corpus")
    q.add_argument("--labels", default="", help="runs: train only on these labels, e.g. fr,it")
    q.add_argument("--rank", type=POSITIVE_INT, default=8)
    q.add_argument("--alpha", type=POSITIVE_NUMBER, default=None, help="scale = alpha / rank (default 2 * rank)")
    q.add_argument("--shared", action="store_true", help="one A/B pair shared by all experts of a layer")
    q.add_argument("--experts", action="append", default=[], metavar="[BLOCK:]IDS",
                   help="adapt only these experts: '1,3' in every MoE block or '2:1,3' for block 2 (repeatable)")
    q.add_argument("--no-experts", action="store_true", help="no expert adapters (router/attention only)")
    q.add_argument("--router", action="store_true", help="adapt the routers too")
    q.add_argument("--attention", default="", help="attention projections to adapt, e.g. q_proj,v_proj")
    q.add_argument("--steps", type=POSITIVE_INT, default=50)
    q.add_argument("--seq-len", dest="seq_len", type=POSITIVE_INT, default=128, help="model folders: sequence length")
    q.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT, default=8, help="model folders: batch size")
    q.set_defaults(func=run_lora)

    q = sub.add_parser("surgery", help="add, remove or merge experts")
    common(q, train=False)
    q.add_argument("action", choices=["add", "remove", "merge"])
    q.add_argument("--n", type=POSITIVE_INT, default=1, help="add: experts to add per layer")
    q.add_argument("--noise", type=NONNEGATIVE_NUMBER, default=0.0, help="add: relative noise on the copies")
    q.add_argument("--bias-update-rate", type=NONNEGATIVE_NUMBER, default=None,
                   help="add: aux-loss-free balancing rate that lets later training reach the new experts")
    q.add_argument("--experts", action="append", default=[], metavar="[BLOCK:]IDS", help="remove: expert ids")
    q.add_argument("--groups", nargs="+", default=[], metavar="A+B", help="merge: groups like 0+3 1+2")
    q.set_defaults(func=run_surgery)
