"""Command line: check a config, or the embedded assets, without running Snakemake.

    dpotox check-config config/config.yaml [more.yaml ...]   # validate; print with defaults
    dpotox assets                                            # verify every embedded file
"""

from __future__ import annotations

import argparse
import sys

import yaml

from dpotox.errors import DpotoxError


def _check_config(args: argparse.Namespace) -> int:
    from dpotox.config import load_config

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpotox`` command."""
    parser = argparse.ArgumentParser(prog="dpotox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate config files (later ones override earlier)")
    p.add_argument("files", nargs="+")
    p.add_argument("-q", "--quiet", action="store_true", help="print only ok")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("assets", help="verify the embedded PyPI assets (sha256)")
    p.set_defaults(func=_assets)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DpotoxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
