"""Latent loader throughput: samples/s of LatentShards.batch per number of DataLoader workers.

    python bench/data.py 'SHARDS/shard-{000000..000099}.tar' --batch 256 --workers 0,1,2,4 --step-ms 120
    python bench/data.py SHARDS --smoke --no-save      # a shard folder works too (its manifest names the shards)

Per worker count: the first batch is timed on its own (worker start-up, first shard reads), then
batches are drawn for --seconds after a warm-up; epoch ends (workers restart per epoch) fall inside
the timing as they would in training. With --step-ms (ms per training step at this batch), the table
says whether the loader keeps up: needed = batch / step seconds.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_smoke, at_least, environment, finish, parser, positive, print_table, synchronize  # noqa: E402

from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.devices import resolve_device  # noqa: E402
from stmd_fast.data.latents import LatentShards, read_manifest  # noqa: E402


def worker_counts(text: str) -> list[int]:
    """argparse type of --workers: comma-separated counts of at least 0."""
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, e.g. 0,1,2,4; got {text!r}") from None
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"worker counts are at least 0 (0: load in the main process), got {text}")
    return counts


SMOKE = {"workers": [0], "seconds": 1.0, "warmup": 1, "no_save": True}


def build_parser():
    p = parser("data.py", __doc__)
    p.add_argument("shards", help="brace pattern of shards (as the trainer takes it) or the shard folder")
    p.add_argument("--batch", type=at_least(1), default=256, help="samples per batch")
    p.add_argument("--workers", type=worker_counts, default="0,1,2,4", help="comma-separated DataLoader worker counts")
    p.add_argument("--seconds", type=positive, default=5.0, help="timed seconds per worker count")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed batches after the first")
    p.add_argument("--step-ms", type=positive, default=None, help="ms per training step: compare with its consumption")
    p.add_argument("--shuffle-buffer", type=at_least(1), default=1000, help="samples held for shuffling, as "
                   "the trainer's stream holds them")
    p.add_argument("--device", default="auto", help="where batches go (cuda includes the pinned copy)")
    p.add_argument("--smoke", action="store_true", help="1 s with 0 workers on the given shards, not saved (CI; "
                   "it sets --workers, --seconds and --warmup itself)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    return p


def shard_pattern(shards: str) -> str:
    """A shard folder -> the pattern its manifest records; a pattern or a tar path as given."""
    folder = Path(shards)
    if folder.is_dir():
        return str(folder / read_manifest(folder)["pattern"])
    return shards


def measure(urls: str, workers: int, args, device: torch.device, needed: float | None) -> dict:
    data = LatentShards(urls, num_workers=workers, shuffle_buffer=args.shuffle_buffer, device=device)
    generator = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    data.batch(args.batch, generator)
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        data.batch(args.batch, generator)
    synchronize(device)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        data.batch(args.batch, generator)
        batches += 1
    synchronize(device)  # note: the last copies to the GPU are only done here
    elapsed = time.perf_counter() - start
    rate = batches * args.batch / elapsed
    return {"workers": data.num_workers, "samples_per_s": rate, "ms_per_batch": 1e3 * elapsed / batches,
            "first_batch_s": first_s, "epochs_seen": data.epoch + 1, "skipped_shards": data.skipped_shards,
            "vs_needed": None if needed is None else rate / needed}


@one_line_errors(ValueError)  # shards that are missing or not ours (DataError): one line, exit code 2
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, SMOKE)
    device = resolve_device(args.device)
    urls = shard_pattern(args.shards)
    probe = LatentShards(urls, num_workers=0)  # checks the shards and manifest before any timing
    asked = args.workers
    # a worker reads whole shards, so the loader runs min(workers, shards) of them: each count once
    counts = list(dict.fromkeys(min(w, len(probe.urls)) for w in asked))
    if counts != asked:  # said for what it is: a count over the shards, or one given twice
        why = [f"{len(probe.urls)} shard(s) feed at most {len(probe.urls)} worker(s)"] * any(w > len(probe.urls) for w in asked)
        why += ["a count given twice is measured once"] * (len(set(asked)) < len(asked))
        print(f"note: {' and '.join(why)}: measuring {','.join(map(str, counts))} workers instead of "
              f"{','.join(map(str, asked))}")
    needed = None if args.step_ms is None else args.batch / (args.step_ms / 1e3)

    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | {len(probe.urls)} shards, {probe.count} samples "
          f"of {'x'.join(map(str, probe.shape))} | batch {args.batch}"
          + ("" if needed is None else f" | a {args.step_ms:g} ms step needs {needed:.0f} samples/s"))
    rows = [measure(urls, w, args, device, needed) for w in counts]
    print_table(rows, ["workers", "samples_per_s", "ms_per_batch", "first_batch_s", "epochs_seen", "vs_needed"])
    best = max(rows, key=lambda row: row["samples_per_s"])
    if needed is not None:
        verdict = "keeps up with" if best["samples_per_s"] >= needed else "is slower than"
        print(f"best: {best['workers']} workers, {best['samples_per_s']:.0f} samples/s: the loader {verdict} "
              f"training ({needed:.0f} samples/s needed)")
    result = {"environment": env, "shards": len(probe.urls), "samples": probe.count,  # of the shards given, not the whole manifest's
              "latent_shape": list(probe.shape), "batch": args.batch, "seconds": args.seconds,
              "step_ms": args.step_ms, "needed_samples_per_s": needed, "best_workers": best["workers"],
              "results": rows}
    finish("data", result, save=not args.no_save)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
