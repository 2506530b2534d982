"""Proposal-free click mode against the default chain (issue #24): wall time from scratch per stage, the box-CorLoc it
costs, and the single-pass CAM's images/s against a plain forward pass of the same SPAM network.

    .venv/bin/python bench/proposal_free.py                 # voc07-sample, 750 images, from scratch (long, CPU)
    .venv/bin/python bench/proposal_free.py --limit 30      # a quick check on the first 30 trainval images
    .venv/bin/python bench/proposal_free.py --skip-chains   # only the throughput check

1. **From scratch**: ``PseudoLabels`` of the default chain (selective search, selection, crop classifier, CAMs of
   the default layers, stage 5) and ``PseudoLabels --proposals none`` (image-level SPAM network, one forward pass per
   image, stage 5's box about each click), each in a fresh outputs root (``<out>/scratch/<mode>``, removed first)
   with its own ``python -m luigi`` process; the seconds of each stage are read from its params.json (the run that
   computed it). Target: the proposal-free total >= ``SPEEDUP_TARGET`` times faster. Both rows' box-CorLoc,
   CorLoc and mean IoU are printed beside (no quality target: this is the fast mode; within ``CLOSE_POINTS`` of the
   default is said loudly).
2. **Single pass**: efficientnet_lite0 with seed 003's CAM layer and SPAM pooling (ImageNet body, random head;
   timing only) on batches of the classifier's input size: ``net(x)`` (a plain forward pass, pooled scores) against
   :func:`pipeline.pooling.cam_forward` (scores and the class maps), alternated, median of ``--repeats``. Target:
   CAM images/s >= ``THROUGHPUT_TARGET`` x forward images/s.

Writes ``<out>/proposal_free.md`` and ``.json``; exits 1 when a target is missed. Timings taken while other work
shares the CPU are not valid numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

import torch  # noqa: E402

from pipeline.io import read_json, write_text  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"
SPEEDUP_TARGET = 4.0
THROUGHPUT_TARGET = 0.9
CLOSE_POINTS = 3.0
MODES = {"default": [], "proposals_none": ["--proposals", "none"]}
#: the table's row order (the order the stages run in)
STAGE_ORDER = ("PrepareDataset", "SelectiveSearchShard", "SelectiveSearch", "SelectProposals", "TrainClassifier",
               "GenerateCAMsShard", "GenerateCAMs", "FusePseudoBoxes", "ProposalFreeBoxes")


def run_chain(mode: str, data_args: list[str], root: Path) -> dict:
    """``PseudoLabels`` of ``mode`` from scratch in ``root``: wall seconds, per-stage seconds and the metrics."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {**os.environ, "CLICKSCALE_OUTPUTS": str(root), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "luigi", "--module", "tasks.main", "PseudoLabels", "--local-scheduler",
           *data_args, *MODES[mode]]
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the pipeline failed (exit code {proc.returncode}): {' '.join(cmd)}")
    summary = read_json(next(root.glob("PseudoLabels/*/summary.json")))
    per_stage: dict[str, float] = {}
    for row in summary["stages"]:  # a stage with several outputs (e.g. two CAM layers) adds up
        family = row["stage"].split("/")[0]
        per_stage[family] = per_stage.get(family, 0.0) + float(row["seconds"] or 0.0)
    m = summary["metrics"].get("metrics") or {}
    return {"mode": mode, "wall_s": wall, "stages": per_stage,
            "box_corloc": 100 * m.get("box_accuracy", float("nan")), "corloc": 100 * m.get("corloc", float("nan")),
            "mean_iou": 100 * m.get("mean_iou", float("nan")), "fallbacks": summary["metrics"]["boxes"]["fallback"]}


def throughput(batch: int, repeats: int, input_px: int, device: str) -> dict:
    """Images/s of a plain forward pass and of the single-pass CAM of the same SPAM network (module docstring)."""
    from pipeline.backbones import build_backbone
    from pipeline.device import resolve_device
    from pipeline.pooling import cam_forward, with_cam_head

    dev = resolve_device(device)
    net = with_cam_head(build_backbone("efficientnet_lite0", 20, "imagenet"), "spam").to(dev).eval()
    x = torch.randn(batch, 3, input_px, input_px, generator=torch.Generator().manual_seed(0)).to(dev)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            fn(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return batch / (time.perf_counter() - t)

    timed(net), timed(lambda v: cam_forward(net, v))  # warm-up
    fwd, cam = [], []
    for _ in range(repeats):
        fwd.append(timed(net))
        cam.append(timed(lambda v: cam_forward(net, v)))
    f, c = statistics.median(fwd), statistics.median(cam)
    return {"device": str(dev), "batch": batch, "input_px": input_px, "forward_images_s": f, "cam_images_s": c,
            "ratio": c / f}


def markdown(chains: list[dict], tp: dict | None) -> str:
    lines = []
    if chains:
        order = {s: i for i, s in enumerate(STAGE_ORDER)}
        stages = sorted({s for c in chains for s in c["stages"]}, key=lambda s: (order.get(s, len(order)), s))
        head = "| stage | " + " | ".join(c["mode"] for c in chains) + " |"
        lines += [head, "|---|" + "---:|" * len(chains)]
        for s in stages:
            lines.append(f"| {s} | " + " | ".join(f"{c['stages'][s]:.0f}" if s in c["stages"] else "-"
                                                  for c in chains) + " |")
        lines.append("| **wall time of the luigi process** | " + " | ".join(f"{c['wall_s']:.0f}" for c in chains)
                     + " |")
        for key, name in (("box_corloc", "box-CorLoc"), ("corloc", "CorLoc"), ("mean_iou", "mean IoU")):
            lines.append(f"| {name} | " + " | ".join(f"{c[key]:.1f}" for c in chains) + " |")
        lines.append("| fallbacks | " + " | ".join(str(c["fallbacks"]) for c in chains) + " |")
    if tp:
        lines += ["", f"Single-pass CAM of the SPAM network ({tp['device']}, batch {tp['batch']}, "
                      f"{tp['input_px']} px): forward {tp['forward_images_s']:.1f} images/s, CAM "
                      f"{tp['cam_images_s']:.1f} images/s, ratio {tp['ratio']:.2f}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="first N trainval images only (0: all 750)")
    ap.add_argument("--workers", type=int, default=2, help="selective search processes (--ss-workers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-chains", action="store_true", help="only the single-pass throughput check")
    ap.add_argument("--batch", type=int, default=16, help="images per pass of the throughput check")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="outputs/bench/proposal_free")
    args = ap.parse_args(argv)
    out = REPO / args.out
    chains = []
    if not args.skip_chains:
        if not (SAMPLE / "VOC2007").is_dir():
            print(f"voc07-sample not found at {SAMPLE}", file=sys.stderr)
            return 2
        from bench.quality import subset_root  # the same first-N subsets as the quality table

        root, clicks = subset_root(args.limit) if args.limit else (SAMPLE / "VOC2007", SAMPLE / "clicks_trainval.csv")
        data = ["--voc-root", str(root), "--clicks", str(clicks), "--annotator", "1", "--ss-workers",
                str(args.workers), "--device", args.device]
        chains = [run_chain(mode, data, out / "scratch" / mode) for mode in MODES]
    tp = throughput(args.batch, args.repeats, 224, args.device)
    md = markdown(chains, tp)
    failures = []
    if chains:
        speedup = chains[0]["wall_s"] / chains[1]["wall_s"]
        md += f"\n\nSpeed-up of --proposals none from scratch: {speedup:.2f}x (target >= {SPEEDUP_TARGET:g}x)"
        if speedup < SPEEDUP_TARGET:
            failures.append(f"--proposals none is {speedup:.2f}x faster from scratch, target {SPEEDUP_TARGET:g}x")
        gap = chains[0]["box_corloc"] - chains[1]["box_corloc"]
        md += (f"\n\n**--proposals none is within {CLOSE_POINTS:g} points of the default box-CorLoc ({gap:+.1f})**"
               if gap <= CLOSE_POINTS else f"\n\n--proposals none costs {gap:.1f} points of box-CorLoc")
    if tp["ratio"] < THROUGHPUT_TARGET:
        failures.append(f"single-pass CAM at {tp['ratio']:.2f}x the forward pass, target {THROUGHPUT_TARGET}x")
    md += "\n\n" + ("\n".join(f"FAIL: {f}" for f in failures) or "PASS")
    write_text(out / "proposal_free.md", md + "\n")
    write_text(out / "proposal_free.json", json.dumps({"chains": chains, "throughput": tp}, indent=1) + "\n")
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
