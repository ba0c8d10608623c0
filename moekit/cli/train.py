"""`moekit train CONFIG`: train a language model from a TrainConfig JSON file (flags override it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import NONNEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER


def run(args: argparse.Namespace) -> int:
    from ..config_base import ConfigError, apply_overrides, read_json
    from ..train.trainer import TrainConfig, Trainer, prepare_data, resolve_device

    data = read_json(args.config)
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: expected a JSON object")
    for flag in ("out_dir", "steps", "lr", "data_dir", "corpus", "seed", "batch_size", "device"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    cfg = TrainConfig.from_dict(apply_overrides(data, args.set, TrainConfig), where=args.config)
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir!r} is a file, not a folder")
    resolve_device(cfg.device)  # a device this machine lacks fails before the corpus is built
    if args.expert_parallel is not None:
        from ..parallel.training import start_parallel

        parallel = start_parallel(args.expert_parallel, args.dist_timeout)
        shard = f" on rank 0 (experts sharded over {args.expert_parallel} ranks)"

        def fit_parallel() -> int:
            # Inside parallel.run, which tears the process groups down on every path.
            trainer = Trainer(cfg, parallel.main_first(lambda: prepare_data(cfg)), parallel=parallel)
            return _fit(args, cfg, trainer, parallel.is_main, shard)

        return parallel.run(fit_parallel)
    return _fit(args, cfg, Trainer(cfg, prepare_data(cfg)), True, "")


def _fit(args: argparse.Namespace, cfg: Any, trainer: Any, main: bool, where: str) -> int:
    from ..train.checkpoint import latest_checkpoint

    say = print if main else (lambda *a, **k: None)
    if args.resume:
        found = latest_checkpoint(f"{cfg.out_dir}/checkpoints")
        if found is None:
            say(f"no checkpoint in {cfg.out_dir}/checkpoints; starting from step 0")
        else:
            # The newest checkpoint that verifies; newer ones that fail are named, not silently used.
            found = trainer.resume(found.parent)
            for line in trainer.resume_skipped:
                say(f"warning: {line}")
            _refuse_corrupt_experts(args, trainer.model, found)
            say(f"resumed from {found} at step {trainer.step}")
    s = trainer.model.param_summary()
    say(f"model: {s['total_params']:,} parameters{where}, {s['active_params']:,} active per token, "
        f"{s['flops_per_token']['train'] / 1e6:.1f} MFLOPs/token (training); MoE layers {s['moe_layers']}")
    if args.quarantine:
        from ..health import Quarantine

        if trainer.parallel is not None:
            from ..config import ConfigError

            raise ConfigError("--quarantine cannot be combined with --expert-parallel (each rank would mask "
                              "experts on its own)")
        with Quarantine(trainer.model) as guard:
            trainer.fit()
        for e in guard.events:
            say(f"quarantined during training: {e.layer} experts {e.experts} (masked from then on; saved in "
                f"the checkpoint)")
    else:
        trainer.fit()
    if trainer.evals:
        last = trainer.evals[-1]
        say(f"step {last['step']}: validation loss {last['loss']:.4f}; per label "
              + ", ".join(f"{k} {v:.3f}" for k, v in last["per_label"].items()))
    return 130 if trainer.interrupted else 0


def _refuse_corrupt_experts(args: argparse.Namespace, model: Any, path: Any) -> None:
    """Resuming from experts with NaN/Inf weights would train on garbage: a CorruptExpertError
    naming each layer and expert (unless --quarantine masks them)."""
    from ..health import CorruptExpertError, quarantine_experts, scan_weights
    from ..model_ops import moe_layers

    # Experts masked in the checkpoint were quarantined by the run that saved it: they stay masked.
    masked = {name: set(layer.masked_experts) for name, layer in moe_layers(model)}
    findings = [f for f in scan_weights(model) if f.expert not in masked.get(f.layer, set())]
    if findings and not getattr(args, "quarantine", False):
        raise CorruptExpertError(findings, str(path))
    if findings:
        quarantine_experts(model, findings)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a language model from a config file")
    p.add_argument("config", help="TrainConfig JSON (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's newest checkpoint that verifies (with its masked experts)")
    p.add_argument("--quarantine", action="store_true",
                   help="mask an expert whose outputs turn NaN/Inf and go on training with the others "
                        "(masks are saved in checkpoints and restored by --resume)")
    p.add_argument("--out-dir", dest="out_dir")
    p.add_argument("--steps", type=POSITIVE_INT)
    p.add_argument("--lr", type=POSITIVE_NUMBER)
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--corpus")
    p.add_argument("--seed", type=NONNEGATIVE_INT)
    p.add_argument("--device", help="where to train: cpu, cuda, cuda:N or auto (CUDA when available); "
                                    "default: the config's (cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.moe.router.top_k=1")
    p.add_argument("--expert-parallel", dest="expert_parallel", type=POSITIVE_INT, metavar="P",
                   help="shard experts over P ranks (run under torchrun; the world size must be a multiple "
                        "of P, the rest is data parallelism)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=POSITIVE_NUMBER, default=300.0, metavar="SECONDS",
                   help="with --expert-parallel: a rank that fails or hangs makes every rank exit with an "
                        "error after this many seconds (default 300)")
    p.set_defaults(func=run)
