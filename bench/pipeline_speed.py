"""Speed of the main job against the physical floor of each stage (issue 23).

Runs ``PseudoLabels`` (what ``make pseudo-labels`` runs) from scratch in its own outputs root, then reads every
stage's wall time, CPU time and peak memory from its ``params.json`` (tasks/base.py) and measures, in the same
run on the same images, each stage's floor:

* selective search: the bare OpenCV calls (bench/proposals.py ``time_raw``: images decoded and resized beforehand)
  on every image the stage searched, in one process per core, interleaved; the floor is the slowest process;
* classifier: the stage's training steps (same model, optimizer, batch size, epochs, micro-batches, the same
  training set's targets and order) on crops already in memory (a pool of the training set's own crops, cut
  beforehand), so no decoding or cropping: the sum of the epochs' seconds;
* CAMs: one forward pass (no autograd) of the trained classifier over as many crops as the CAM stage computed, in
  its batch size and memory format (bench/cam_throughput.py ``forward_only``).

Stages without a floor (dataset, selection, the merges, pseudo boxes) count against the job with a floor of 0.
The two-layer CAM pass (``--cam-layers``: one forward, one backward) is also timed against one-layer passes on the
trained classifier: the pass of the lowest of the layers (as deep as the two-layer backward must go) and of each
layer alone.

    python bench/pipeline_speed.py                 # voc07-sample (../shared/data/voc07-sample)
    python bench/pipeline_speed.py --limit 30      # the sample's first 30 trainval images (a quick check)
    python bench/pipeline_speed.py --synthetic     # the embedded synthetic default (make pseudo-labels)
    python bench/pipeline_speed.py --cam-pass-only # only the two-layer vs one-layer CAM pass (ImageNet weights)
    python bench/pipeline_speed.py --limit 30 --reuse --floor-epochs 1   # floors again on the last run's outputs

Writes ``speed.csv`` and ``speed.md`` in the outputs root (default ``outputs/bench/speed/<dataset>/``, emptied
first). Targets (exit status 1 when one is missed): the whole job within 1.3x the sum of its stages' floors
(voc07-sample runs), the two-layer CAM pass <= 1.15x the lowest layer's one-layer pass, the synthetic job <= 240 s,
and CPU utilisation (CPU time / wall / cores) >= 85% in every stage of more than 20 s. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline.device import cpu_cores  # noqa: E402
from pipeline.io import read_json, write_csv, write_json, write_text  # noqa: E402
from pipeline.markdown import markdown_table  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"
MAX_JOB_RATIO = 1.3
MAX_TWO_LAYER_RATIO = 1.15
MAX_SYNTHETIC_SECONDS = 240.0
MIN_CPU_UTIL = 0.85
LONG_STAGE_SECONDS = 20.0
#: the stages whose floor is measured: family -> floor name
FLOOR_OF = {"SelectiveSearchShard": "selective search", "TrainClassifier": "classifier",
            "GenerateCAMsShard": "CAM forward"}


# -- the job ------------------------------------------------------------------------------------------------
def job_command(data_args: list[str], extra: list[str]) -> list[str]:
    """The luigi command of ``make pseudo-labels`` (Makefile: LUIGI), as ``python -m luigi`` from the repository
    root (so this checkout's ``tasks`` is the one imported)."""
    return [sys.executable, "-m", "luigi", "--module", "tasks", "--local-scheduler", "PseudoLabels", *data_args,
            *extra]


def run_job(cmd: list[str], outputs: Path) -> dict:
    """Run the job with ``outputs`` as its outputs root; wall seconds and the CPU seconds of the whole process
    tree (waited-for children)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    log = outputs / "job.log"
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "CLICKSCALE_OUTPUTS": str(outputs)}, stdout=f,
                             stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"the job failed (exit {res.returncode}); its log: {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "log": str(log)}


def stage_outputs(outputs: Path) -> pd.DataFrame:
    """One row per stage output under ``outputs`` (family, directory and its params.json numbers)."""
    rows = []
    for pj in sorted(outputs.glob("*/*/params.json")):
        meta = read_json(pj)
        rows.append({"family": pj.parent.parent.name, "dir": str(pj.parent), "seconds": meta.get("seconds"),
                     "cpu_seconds": meta.get("cpu_seconds"), "cores": meta.get("cores"),
                     "peak_rss_mb": max(meta.get("peak_rss_mb") or 0, meta.get("peak_rss_children_mb") or 0),
                     "finished": meta.get("finished") or "", "params": meta.get("params", {})})
    if not rows:
        raise SystemExit(f"{outputs}: no stage outputs (params.json) found")
    # families in the order the job finished them (their first output)
    df = pd.DataFrame(rows)
    first = df.groupby("family").finished.min()
    return df.assign(_order=df.family.map(first)).sort_values(["_order", "finished"], kind="mergesort").drop(
        columns="_order").reset_index(drop=True)


def one_dir(stages: pd.DataFrame, family: str) -> Path:
    dirs = stages[stages.family == family].dir.tolist()
    if len(dirs) != 1:
        raise SystemExit(f"expected one {family} output, found {len(dirs)}: {dirs}")
    return Path(dirs[0])


# -- floors -------------------------------------------------------------------------------------------------
def _raw_ss_worker(job: tuple[list[str], str, int]) -> float:
    """One process of the selective-search floor (module level: spawned processes import it)."""
    sys.path.insert(0, str(REPO / "bench"))
    from proposals import time_raw  # bench/proposals.py

    from pipeline.proposals import SelectiveSearchParams

    paths, mode, max_side = job
    return time_raw([Path(p) for p in paths], SelectiveSearchParams(mode=mode, max_side=max_side)) if paths else 0.0


def selective_search_floor(stages: pd.DataFrame, manifest, processes: int) -> dict:
    """Raw OpenCV selective search on every image the shards searched, ``processes`` processes in parallel."""
    shards = stages[stages.family == "SelectiveSearchShard"]
    p = shards.params.iloc[0]
    splits = sorted({s.get("ss_split", "trainval") for s in shards.params})
    paths = [str(x) for split in splits for x in manifest.split(split).path]
    chunks = [(paths[i::processes], p["ss_mode"], int(p["ss_image_max_px"])) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        seconds = pool.map(_raw_ss_worker, chunks)
    return {"seconds": max(seconds), "images": len(paths), "processes": processes}


class InMemoryCrops(torch.utils.data.Dataset):
    """The classifier's training set with its inputs already cut: item ``i`` is the pooled crop ``i % len(pool)``
    with item i's own target (a forward/backward costs the same whatever the pixels); ``image_ids`` and targets are
    the real set's, so the sampler orders and batches the items as the stage did."""

    def __init__(self, dataset, pool_size: int = 64):
        self.image_ids, self.targets, self.multilabel = dataset.image_ids, dataset.targets, dataset.multilabel
        self.pool = torch.stack([dataset[(i, 0)][0] for i in range(min(pool_size, len(dataset)))])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key):
        index = int(key[0] if isinstance(key, tuple) else key)
        target = torch.from_numpy(self.targets[index]) if self.multilabel else int(self.targets[index])
        return self.pool[index % len(self.pool)], target


def classifier_floor(stages: pd.DataFrame, manifest, device: torch.device, epochs: int = 0) -> dict:
    """The classifier stage's training steps on in-memory crops: the sum of its epochs' seconds. ``epochs`` > 0
    (a quick check): train that many of the stage's epochs and scale their seconds to all of them."""
    from pipeline.backbones import build_backbone
    from pipeline.classifier import TrainConfig, stage_training_set, train_classifier

    cdir = one_dir(stages, "TrainClassifier")
    report = read_json(cdir / "report.json")
    if report.get("mode") != "crops":
        raise SystemExit(f"{cdir}: the classifier floor is measured for classifier_mode=crops only")
    cfg = TrainConfig(**report["train"], device=str(device), workers=0)
    model = build_backbone(report["backbone"], len(manifest.classes), report["weights"], seed=cfg.seed)
    model.input_size = report["input_size"]
    selection = one_dir(stages, "SelectProposals") / "selected.parquet"
    dataset, _ = stage_training_set(manifest, selection, input_size=report["input_size"], mean=model.mean,
                                    std=model.std, seed=cfg.seed,
                                    max_crops_per_class=report.get("max_crops_per_class"))
    if len(dataset) != report["training_items"]:
        raise SystemExit(f"{cdir}: rebuilt training set has {len(dataset)} items, the stage had "
                         f"{report['training_items']}")
    data = InMemoryCrops(dataset)
    all_epochs = cfg.epochs
    if 0 < epochs < all_epochs:
        cfg = replace(cfg, epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        log = train_classifier(model, data, tmp, cfg, resume=False, progress=False)
    return {"seconds": float(log.seconds.sum()) * all_epochs / cfg.epochs, "items": len(dataset),
            "epochs": all_epochs, "measured_epochs": cfg.epochs}


def cam_floor(stages: pd.DataFrame, device: torch.device, pass_crops: int, repeats: int) -> tuple[dict, dict]:
    """One forward of the trained classifier over the CAM stage's crop count (the floor), and the two-layer CAM
    pass against one-layer passes on ``pass_crops`` crops."""
    sys.path.insert(0, str(REPO / "bench"))
    from cam_throughput import forward_only  # bench/cam_throughput.py

    from pipeline.cam import prefer_channels_last
    from pipeline.classifier import load_classifier

    summary = read_json(one_dir(stages, "GenerateCAMs") / "summary.json")
    net = load_classifier(one_dir(stages, "TrainClassifier") / "model.pt", device).eval()
    fmt = torch.channels_last if prefer_channels_last(net, device) else torch.contiguous_format
    net = net.to(memory_format=fmt)
    batch = crop_batch(int(summary["batch_size"]), int(summary["crop_size"]), device, fmt)
    forward_only(net, batch, len(batch))  # warm-up
    t0 = time.perf_counter()
    forward_only(net, batch, int(summary["crops"]))
    sync(device)
    floor = {"seconds": time.perf_counter() - t0, "crops": int(summary["crops"]),
             "batch_size": int(summary["batch_size"]), "crop_size": int(summary["crop_size"])}
    passes = cam_pass_costs(net, batch, list(summary["layers"]), pass_crops, repeats, device)
    return floor, passes


def crop_batch(batch_size: int, size: int, device: torch.device, fmt) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cam_pass_costs(net, batch: torch.Tensor, layers: list[str], n_crops: int, repeats: int,
                   device: torch.device) -> dict:
    """Seconds (median of ``repeats``) of SA-CAM passes over ``n_crops`` crops in batches like ``batch``: all of
    ``layers`` in one pass, and each layer alone; ``ratio``: the one-pass time over the lowest layer's pass alone
    (its backward reaches as deep as the one pass's)."""
    from pipeline.cam import SACAM

    targets = torch.arange(len(batch), device=device) % net.num_classes

    def run(names: list[str]) -> float:
        times = []
        with SACAM(net, layers=names) as cam:
            cam.forward_layers(batch, targets)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                for start in range(0, n_crops, len(batch)):
                    n = min(len(batch), n_crops - start)
                    cam.forward_layers(batch[:n], targets[:n])
                sync(device)
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    single = {layer: run([layer]) for layer in layers}
    both = run(layers)
    lowest = lowest_layer(net, layers, batch[:2])
    return {"layers": layers, "crops": n_crops, "one_pass": both, "single": single, "lowest": lowest,
            "ratio": both / single[lowest], "ratio_vs_each": {k: both / v for k, v in single.items()}}


def lowest_layer(net, layers: list[str], x: torch.Tensor) -> str:
    """The first of ``layers`` a forward pass reaches (where a multi-layer CAM pass cuts the graph)."""
    order = []
    handles = [net.layer_module(n).register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in layers]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return order[0]


# -- the table ----------------------------------------------------------------------------------------------
def stage_table(stages: pd.DataFrame, floors: dict, images: dict, cores: int) -> pd.DataFrame:
    """Per stage family: seconds (summed over its outputs; luigi ran them one after the other), floor seconds,
    ratio, images/s, CPU utilisation and peak RSS."""
    rows = []
    for family, g in stages.groupby("family", sort=False):
        secs = float(g.seconds.sum())
        cpu = float(g.cpu_seconds.sum()) if g.cpu_seconds.notna().all() else float("nan")
        floor = floors.get(family)
        rows.append({"stage": family, "outputs": len(g), "seconds": secs,
                     "floor_seconds": floor, "floor": FLOOR_OF.get(family, ""),
                     "ratio": secs / floor if floor else None,
                     "images_per_s": images.get(family, images["trainval"]) / secs if secs > 0 else None,
                     "cpu_util": cpu / secs / cores if secs > 0 else None,
                     "peak_rss_mb": float(g.peak_rss_mb.max())})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)

    return markdown_table(
        ["stage", "outputs", "seconds", "floor seconds", "ratio", "images/s", "CPU util %", "peak RSS MB"],
        [(r.stage, r.outputs, f(r.seconds, ".1f"), f(r.floor_seconds, ".1f") + (f" ({r.floor})" if r.floor else ""),
          f(r.ratio, ".2f"), f(r.images_per_s, ".2f"), f(None if r.cpu_util is None else 100 * r.cpu_util, ".0f"),
          f(r.peak_rss_mb, ".0f")) for r in table.itertuples(index=False)], "lrrrrrrr")


def check_targets(table: pd.DataFrame, job: dict, passes: dict, synthetic: bool) -> list[str]:
    missed = []
    if not synthetic and job["ratio"] > MAX_JOB_RATIO:
        missed.append(f"job ratio {job['ratio']:.2f} > {MAX_JOB_RATIO} (sum of stage seconds / sum of floors)")
    if passes["ratio"] > MAX_TWO_LAYER_RATIO:
        missed.append(f"{len(passes['layers'])}-layer CAM pass {passes['ratio']:.2f}x the {passes['lowest']} pass "
                      f"> {MAX_TWO_LAYER_RATIO}x")
    if synthetic and job["wall"] > MAX_SYNTHETIC_SECONDS:
        missed.append(f"synthetic job {job['wall']:.0f} s > {MAX_SYNTHETIC_SECONDS:.0f} s")
    for r in table.itertuples(index=False):
        if r.seconds > LONG_STAGE_SECONDS and r.cpu_util is not None and r.cpu_util < MIN_CPU_UTIL:
            missed.append(f"{r.stage}: CPU utilisation {100 * r.cpu_util:.0f}% < {100 * MIN_CPU_UTIL:.0f}% "
                          f"over {r.seconds:.0f} s")
    return missed


# -- main ---------------------------------------------------------------------------------------------------
def dataset_args(args) -> tuple[str, list[str]]:
    if args.synthetic:
        return "synthetic", ["--data-root", str(args.outputs / "data")]
    if not (SAMPLE / "VOC2007").is_dir():
        raise SystemExit(f"voc07-sample not found at {SAMPLE} (or run with --synthetic)")
    if args.limit:
        sys.path.insert(0, str(REPO / "bench"))
        from quality import subset_root  # bench/quality.py: links to the sample, no copies

        root, clicks = subset_root(args.limit)
        return f"voc07-sample first {args.limit}", ["--voc-root", str(root), "--clicks", str(clicks)]
    return "voc07-sample", ["--voc-root", str(SAMPLE / "VOC2007"), "--clicks", str(SAMPLE / "clicks_trainval.csv")]


def cam_pass_only(args) -> int:
    """The two-layer vs one-layer CAM pass on the default backbone with its ImageNet weights, random crops."""
    from pipeline.backbones import build_backbone
    from pipeline.cam import prefer_channels_last
    from pipeline.cam_writer import auto_batch_size
    from tasks.defaults import TUNED

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_backbone(TUNED.classifier_backbone, 20, "imagenet").to(device).eval()
    fmt = torch.channels_last if prefer_channels_last(net, device) else torch.contiguous_format
    net = net.to(memory_format=fmt)
    batch = crop_batch(auto_batch_size(device), TUNED.classifier_input_px, device, fmt)
    layers = list(TUNED.cam_layers[TUNED.classifier_backbone])
    p = cam_pass_costs(net, batch, layers, args.pass_crops, args.repeats, device)
    print(pass_line(p, TUNED.classifier_backbone, device))
    ok = p["ratio"] <= MAX_TWO_LAYER_RATIO
    print("target met" if ok else f"TARGET MISSED: {p['ratio']:.2f}x > {MAX_TWO_LAYER_RATIO}x")
    return 0 if ok else 1


def pass_line(p: dict, backbone: str, device) -> str:
    singles = ", ".join(f"{k} alone {v:.2f} s" for k, v in p["single"].items())
    each = ", ".join(f"{v:.2f}x {k}" for k, v in p["ratio_vs_each"].items())
    return (f"SA-CAM pass of {backbone} on {device}, {p['crops']} crops: {' + '.join(p['layers'])} in one pass "
            f"{p['one_pass']:.2f} s; {singles} -> {p['ratio']:.2f}x the {p['lowest']} pass (target <= "
            f"{MAX_TWO_LAYER_RATIO}x; {each})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="the embedded synthetic default instead of voc07-sample")
    ap.add_argument("--limit", type=int, default=0, help="voc07-sample's first N trainval images (0: all)")
    ap.add_argument("--outputs", type=Path, default=None,
                    help="the job's outputs root, emptied first (default outputs/bench/speed/<dataset>)")
    ap.add_argument("--args", default="", help="further job parameters, e.g. '--cam-shards 2'")
    ap.add_argument("--processes", type=int, default=0, help="selective-search floor processes (0: one per core)")
    ap.add_argument("--pass-crops", type=int, default=128, help="crops of the CAM pass comparison")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each CAM pass (median)")
    ap.add_argument("--device", default="auto", help="device of the CAM floor and passes (the job: its default)")
    ap.add_argument("--cam-pass-only", action="store_true", help="only the two-layer vs one-layer CAM pass")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the floors on the outputs of an earlier run of this bench (no new job run)")
    ap.add_argument("--floor-epochs", type=int, default=0,
                    help="a quick check: time this many classifier epochs in its floor and scale (0: all)")
    args = ap.parse_args(argv)
    from pipeline.device import keep_freed_memory

    keep_freed_memory()  # the floors run under the allocator setting every stage runs under (tasks/base.py)
    if args.cam_pass_only:
        return cam_pass_only(args)
    name = "synthetic" if args.synthetic else (f"voc07-sample-first{args.limit}" if args.limit else "voc07-sample")
    args.outputs = (args.outputs or REPO / "outputs" / "bench" / "speed" / name).resolve()
    if args.outputs.exists() and not args.reuse:
        shutil.rmtree(args.outputs)
    args.outputs.mkdir(parents=True, exist_ok=True)
    label, data = dataset_args(args)
    cores = cpu_cores()
    cmd = job_command(data, shlex.split(args.args))
    print(f"{label}: {shlex.join(cmd)}\n  outputs {args.outputs}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    if args.reuse:
        saved = args.outputs / "job.json"
        job = read_json(saved) if saved.is_file() else {"wall": float("nan"), "cpu": float("nan")}
    else:
        job = run_job(cmd, args.outputs)
        write_json(args.outputs / "job.json", job)
    stages = stage_outputs(args.outputs)
    print(f"job: {job['wall']:.1f} s wall, CPU util {100 * job['cpu'] / job['wall'] / cores:.0f}%; measuring the "
          "floors", flush=True)

    from pipeline.dataset import Manifest

    manifest = Manifest.load(one_dir(stages, "PrepareDataset"))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ss = selective_search_floor(stages, manifest, args.processes or cores)
    print(f"  selective search floor: {ss['seconds']:.1f} s ({ss['processes']} processes, {ss['images']} images)",
          flush=True)
    clf = classifier_floor(stages, manifest, device, args.floor_epochs)
    print(f"  classifier floor: {clf['seconds']:.1f} s ({clf['items']} crops, {clf['epochs']} epochs)", flush=True)
    cam, passes = cam_floor(stages, device, args.pass_crops, args.repeats)
    floors = {"SelectiveSearchShard": ss["seconds"], "TrainClassifier": clf["seconds"],
              "GenerateCAMsShard": cam["seconds"]}
    images = {"trainval": len(manifest.split("trainval")), "SelectiveSearchShard": ss["images"],
              "SelectiveSearch": ss["images"]}
    table = stage_table(stages, floors, images, cores)
    job["stage_seconds"] = float(table.seconds.sum())
    job["floor_seconds"] = float(sum(floors.values()))
    job["ratio"] = job["stage_seconds"] / job["floor_seconds"]
    md = markdown(table)
    facts = (f"{label}, {images['trainval']} trainval images, {cores} cores, job wall {job['wall']:.1f} s "
             f"(CPU util {100 * job['cpu'] / job['wall'] / cores:.0f}%), stages {job['stage_seconds']:.1f} s, floors "
             f"{job['floor_seconds']:.1f} s (selective search {ss['processes']} processes on {ss['images']} images; "
             f"classifier {clf['items']} crops x {clf['epochs']} epochs"
             f"{'' if clf['measured_epochs'] == clf['epochs'] else ' scaled from ' + str(clf['measured_epochs'])}; "
             f"CAM forward {cam['crops']} crops of "
             f"{cam['crop_size']} px in batches of {cam['batch_size']} on {device}) -> job ratio "
             f"{job['ratio']:.2f} (target <= {MAX_JOB_RATIO}{'' if not args.synthetic else ', voc07-sample only'})")
    print("\n" + md + "\n\n" + facts + "\n" + pass_line(passes, "the trained classifier", device))
    write_csv(table, args.outputs / "speed.csv")
    write_text(args.outputs / "speed.md", f"# Pipeline speed\n\n`{shlex.join(cmd)}`\n\n{md}\n\n{facts}\n\n"
                                          f"{pass_line(passes, 'the trained classifier', device)}\n")
    missed = check_targets(table, job, passes, args.synthetic)
    for m in missed:
        print(f"TARGET MISSED: {m}")
    if not missed:
        print("all targets met")
    print(f"wrote {args.outputs / 'speed.csv'} and speed.md")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
