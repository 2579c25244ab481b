"""Command line: check a config, or the embedded assets, without running Snakemake; and the
DPO stage, which rule train_dpo runs as a command so that `accelerate launch` can start it
once per GPU.

    dpotox check-config config/config.yaml [more.yaml ...]   # validate; print with defaults
    dpotox assets                                            # verify every embedded file
    dpotox inspect-model SOURCE [--check] [--dtype D] [--json]  # will dpotox run on it?
    dpotox profiles link|unlink [--repo DIR] [--warn-only]   # `--profile local|slurm` by name
    dpotox train-dpo --model-name M --config-json '{...}' [--method M] --base DIR \
        --pairs FILE --out DIR --train-log FILE --checkpoints DIR [--device auto] [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import yaml

from dpotox.errors import DpotoxError


def _check_config(args: argparse.Namespace) -> int:
    from dpotox.plan.config import load_config

    cfg = load_config(*args.files)
    if args.quiet:
        print(f"ok: {', '.join(args.files)}")
    else:
        yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
    return 0


def _assets(args: argparse.Namespace) -> int:
    from dpotox.sources import assets

    failed = 0
    for name, asset in assets.ASSETS.items():
        try:
            paths = assets.asset_paths(name)
            size = sum(p.stat().st_size for p in paths) / 1e6
            print(f"ok      {name:28s} {size:8.1f} MB  {asset.description}")
        except DpotoxError as e:
            failed += 1
            print(f"FAILED  {name:28s} {e}")
    return 1 if failed else 0


def _inspect_model(args: argparse.Namespace) -> int:
    from dpotox.sources.describe import describe, format_description, parse_source

    d = describe(parse_source(args.source), dtype=args.dtype, check=args.check)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0 if d["supported"] else 1


def _train_dpo(args: argparse.Namespace) -> int:
    from dpotox.logs import rule_log
    from dpotox.plan.alignment import trained_method
    from dpotox.stages.dpo import DPOSettings, train_dpo
    from dpotox.stages.pairs import read_pairs

    job = SimpleNamespace(
        rule="train_dpo", wildcards={"model": args.model_name}, log=[args.log] if args.log else []
    )
    with rule_log(job) as log:
        cfg = json.loads(args.config_json)
        settings = DPOSettings.from_config(cfg, args.model_name, args.method or trained_method(cfg))
        pairs = read_pairs(args.pairs)
        log.info("read %d preference pairs from %s", len(pairs), args.pairs)
        summary = train_dpo(
            args.base,
            pairs,
            args.out,
            settings,
            checkpoint_dir=args.checkpoints,
            log_path=args.train_log,
            device=args.device,
            log=log,
        )
        log.info(
            "wrote %s and %s: %d steps (resumed from step %d), best validation loss %s "
            "at step %s, validation reward accuracy %s",
            args.out,
            args.train_log,
            summary["steps"],
            summary["resumed_from_step"],
            summary["best_eval_loss"],
            summary["best_step"],
            summary.get("eval_reward_accuracy"),
        )
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from dpotox.profiles import main as profiles_main

    return profiles_main(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpotox`` command."""
    parser = argparse.ArgumentParser(
        prog="dpotox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate config files (later ones override earlier)")
    p.add_argument("files", nargs="+")
    p.add_argument("-q", "--quiet", action="store_true", help="print only ok")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("assets", help="verify the embedded PyPI assets (sha256)")
    p.set_defaults(func=_assets)
    p = sub.add_parser(
        "inspect-model",
        help="describe a model as dpotox would see it: family, shapes, where the neurons live, "
        "parameters, cluster requests (exit 1 when unsupported)",
    )
    p.add_argument(
        "source",
        help="a local model folder, a hub id (id or id@revision; offline: from the local cache), "
        "a pinned GGUF package as PACKAGE:FILE, or a source mapping as in the config",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also load the weights and run the adapter's checks (as prepare_model does)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_inspect_model)
    p = sub.add_parser(
        "profiles",
        help="link profiles/local and profiles/slurm where Snakemake "
        "looks up profile names (make setup), or remove those links",
    )
    p.add_argument("action", choices=["link", "unlink"])
    p.add_argument("--repo", help="the repository root (default: the current folder)")
    p.add_argument(
        "--config-dir",
        help="Snakemake's profile folder (default: its user config "
        "folder, $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)",
    )
    p.add_argument(
        "--warn-only",
        action="store_true",
        help="link: report a name that cannot be linked as a warning and exit 0",
    )
    p.set_defaults(func=_profiles)
    p = sub.add_parser("train-dpo", help="DPO fine-tuning (rule train_dpo; see dpotox.stages.dpo)")
    p.add_argument("--model-name", required=True, help="the model's key under models:")
    p.add_argument(
        "--config-json", required=True, help="the config as JSON (at least seed, dpo, models)"
    )
    p.add_argument(
        "--method",
        help="the method of alignment.methods to train (default: the one the config names "
        "there, else dpo, the papers' DPO)",
    )
    p.add_argument("--base", required=True, help="prepared base model folder")
    p.add_argument("--pairs", required=True, help="pairs Parquet file (make_pairs)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--train-log", required=True, help="output training log (Parquet)")
    p.add_argument("--checkpoints", required=True, help="checkpoint folder (kept on failure)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--log", help="also log to this file")
    p.set_defaults(func=_train_dpo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DpotoxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
