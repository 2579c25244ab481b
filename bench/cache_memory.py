"""Peak memory of activation caching does not grow with the number of prompts.

    python bench/cache_memory.py [--small 256] [--large 1024] [--batch-size 128]

Caches the embedded model's activations (every layer and neuron, per-prompt means, as rule
cache_activations does) for the first ``--small`` and then the first ``--large`` prompts, each
in a fresh process, and prints each process's peak resident memory (``ru_maxrss``) and their
ratio. Target: a ratio within 1.1 (the caches stream to Parquet batch by batch).
The last line is ``RESULT rss_small_mb=<a> rss_large_mb=<b> ratio=<b/a>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import MODEL_DIR, embedded_prompts


def child(n: int, batch_size: int, model_dir: Path) -> None:
    from dpotox.stages.activations import cache_generation

    adapter, tok, prompts, ids = embedded_prompts(model_dir, n)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, info = cache_generation(
            adapter, tok, prompts, ids, Path(tmp) / "cache", new_tokens=20, batch_size=batch_size
        )
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*") if f.is_file())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "n": n,
                "rss_mb": rss_mb,
                "seconds": seconds,
                "cache_mb": size / 2**20,
                "positions": info["n_positions"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=256)
    ap.add_argument("--large", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch_size, args.model_dir)
        return
    runs = {}
    for n in (args.small, args.large):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--batch-size",
                str(args.batch_size),
                "--model-dir",
                str(args.model_dir),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"caching {n} prompts failed:\n{proc.stderr[-3000:]}")
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[n]
        print(
            f"{n:5d} prompts: peak RSS {r['rss_mb']:.0f} MB, {r['seconds']:.1f} s, cache "
            f"{r['cache_mb']:.1f} MB on disk ({r['positions']} positions)"
        )
    small, large = runs[args.small]["rss_mb"], runs[args.large]["rss_mb"]
    print(f"RESULT rss_small_mb={small:.0f} rss_large_mb={large:.0f} ratio={large / small:.3f}")


if __name__ == "__main__":
    main()
