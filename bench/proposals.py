"""Benchmark of stage 1: seconds per image of the raw OpenCV selective-search calls vs the stage's shard work
(image decode, selective search, mapping/sorting/filtering, checkpoint chunks and HDF5 writes) with 1 and 2
processes, on a fixed set of voc07-sample images.

    .venv/bin/python bench/proposals.py [--n-images 16] [--repeats 2] [--ss-mode fast] [--ss-image-max-px 500]

Targets (exit status 1 when missed): the stage's single-process overhead over raw OpenCV <= 10%, and 2 processes
>= 1.7x faster than 1. Run it on an otherwise idle machine with at least 2 free cores; each figure is the best of
``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402

from pipeline.imageio import read_image  # noqa: E402
from pipeline.proposals import (SelectiveSearchParams, raw_selective_search, resize_for_proposals,  # noqa: E402
                                run_proposal_shard)
from tasks.defaults import TUNED  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc07-sample"
MAX_OVERHEAD = 0.10
MIN_SPEEDUP_2 = 1.7


def fixed_images(voc_root: Path, n: int) -> tuple[list[str], list[Path]]:
    """Every k-th image of trainval.txt (a fixed, spread-out set of n images)."""
    ids = (voc_root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    step = max(1, len(ids) // n)
    ids = ids[::step][:n]
    return ids, [voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]


def time_raw(paths: list[Path], params: SelectiveSearchParams) -> float:
    """Seconds for the bare OpenCV calls on all images (decoded and resized beforehand, not timed)."""
    images = [cv2.cvtColor(resize_for_proposals(read_image(p), params.max_side), cv2.COLOR_RGB2BGR) for p in paths]
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        t0 = time.perf_counter()
        for img in images:
            raw_selective_search(img, params.mode)
        return time.perf_counter() - t0
    finally:
        cv2.setNumThreads(previous)


def time_stage(ids: list[str], paths: list[Path], params: SelectiveSearchParams, workers: int) -> float:
    """Seconds for the shard work of SelectiveSearchShard (as the task runs it) on all images."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_proposal_shard(ids, paths, Path(tmp) / "proposals.h5", params, workers=workers,
                           checkpoint_dir=Path(tmp) / "chunks", progress=False)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc-root", type=Path, default=SAMPLE / "VOC2007")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ss-mode", choices=["fast", "quality"], default=TUNED.ss_mode)
    ap.add_argument("--ss-image-max-px", type=int, default=TUNED.ss_image_max_px)
    args = ap.parse_args(argv)
    if not (args.voc_root / "JPEGImages").is_dir():
        print(f"{args.voc_root}: no JPEGImages/ (voc07-sample missing?)", file=sys.stderr)
        return 2
    ids, paths = fixed_images(args.voc_root, args.n_images)
    params = SelectiveSearchParams(mode=args.ss_mode, max_side=args.ss_image_max_px, min_size=TUNED.ss_box_min_px)
    print(f"{len(ids)} images of {args.voc_root} ({ids[0]} ... {ids[-1]}), mode={args.ss_mode}, "
          f"max_side={args.ss_image_max_px}, best of {args.repeats}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    time_raw(paths[:1], params)  # warm-up (library loading, page cache)
    raw = min(time_raw(paths, params) for _ in range(args.repeats))
    one = min(time_stage(ids, paths, params, 1) for _ in range(args.repeats))
    two = min(time_stage(ids, paths, params, 2) for _ in range(args.repeats))
    n = len(ids)
    overhead = one / raw - 1
    speedup = one / two
    rows = [("raw OpenCV (1 thread)", raw / n, "", ""),
            ("stage, 1 process", one / n, f"overhead {overhead:+.1%}", f"target <= {MAX_OVERHEAD:.0%}"),
            ("stage, 2 processes", two / n, f"speedup {speedup:.2f}x", f"target >= {MIN_SPEEDUP_2}x")]
    print(f"{'':24s} {'s/image':>8s}  {'':18s} {'':16s}")
    for name, s, what, target in rows:
        print(f"{name:24s} {s:8.3f}  {what:18s} {target:16s}")
    failures = []
    if overhead > MAX_OVERHEAD:
        failures.append(f"single-process overhead {overhead:.1%} > {MAX_OVERHEAD:.0%}")
    if speedup < MIN_SPEEDUP_2:
        failures.append(f"2-process speedup {speedup:.2f}x < {MIN_SPEEDUP_2}x")
    for f in failures:
        print(f"TARGET MISSED: {f}")
    if not failures:
        print("all targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
