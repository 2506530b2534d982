"""Computing a CAM store: what to compute (:class:`CamEntry`: a click, or an image/class pair in the image-label-only
mode), how (:class:`CamStoreSettings`), and :func:`write_cam_store`, which computes the fused map of every entry
(:mod:`pipeline.cam_methods`, :mod:`pipeline.cam_crops`) and writes the HDF5 parts of :mod:`pipeline.cam_store`,
each part atomically, so a killed run resumes by skipping finished parts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from .cam_crops import FUSIONS, PASTE_MODES, extract_crops, fusion_weights, layer_grid, paste_maps
from .cam_methods import BaseCAM, make_cam
from .cam_store import (STORE_FORMAT, CamStore, build_index, part_name, partition_digest, plan_parts, plan_record,
                        shard_parts, store_map, store_summary)
from .imageio import ImageReadError, read_image
from .io import atomic_path, read_json, write_csv, write_json

log = logging.getLogger(__name__)


# -- entries: what to compute ---------------------------------------------------------------------------------
@dataclass
class CamEntry:
    """One fused map to compute: a click (``kind="click"``, ``entry_id`` = click_id) or, in the image-label-only
    mode, one class present in an image (``kind="image"``, x = y = NaN, one crop = the whole image)."""

    entry_id: int
    image_id: str
    cls: str
    class_index: int
    x: float
    y: float
    crops: np.ndarray  # (N, 4) float32
    kind: str = "click"


def click_entries(selected: pd.DataFrame, classes: Sequence[str], max_crops: int | None = None) -> list[CamEntry]:
    """Entries from SelectProposals' table (``click_id, image_id, class, x, y, rank, x1, y1, x2, y2``): the
    click's crops in rank order (the first ``max_crops`` when given)."""
    need = {"click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2", "y2"}
    missing = need - set(selected.columns)
    if missing:
        raise ValueError(f"selected-proposals table lacks columns {sorted(missing)}")
    cindex = {c: i for i, c in enumerate(classes)}
    unknown = set(selected["class"]) - set(cindex)
    if unknown:
        raise ValueError(f"selected proposals have classes {sorted(unknown)} the classifier does not know "
                         f"({list(classes)})")
    out = []
    df = selected.sort_values(["image_id", "click_id", "rank"], kind="mergesort")
    for cid, g in df.groupby("click_id", sort=False):
        crops = g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
        if max_crops:
            crops = crops[:max_crops]
        r = g.iloc[0]
        out.append(CamEntry(int(cid), str(r.image_id), str(r["class"]), cindex[r["class"]], float(r.x), float(r.y),
                            crops, "click"))
    return out


def image_entries(labels: pd.DataFrame, image_sizes: dict[str, tuple[int, int]],
                  classes: Sequence[str]) -> list[CamEntry]:
    """Image-label-only mode: one entry per (image_id, class present); ``labels`` has ``image_id, class`` (e.g.
    the objects table; duplicates are dropped). ``image_sizes``: image_id -> (width, height). Entry ids number
    the (image_id, class index) pairs in sorted order from 0."""
    cindex = {c: i for i, c in enumerate(classes)}
    pairs = sorted({(str(i), cindex[c]) for i, c in zip(labels.image_id, labels["class"]) if c in cindex})
    out = []
    for k, (image_id, ci) in enumerate(pairs):
        if image_id not in image_sizes:
            raise ValueError(f"image {image_id} has labels but no known size")
        w, h = image_sizes[image_id]
        out.append(CamEntry(k, image_id, classes[ci], ci, math.nan, math.nan,
                            np.array([[0, 0, w, h]], np.float32), "image"))
    return out



# -- images ---------------------------------------------------------------------------------------------------
class _ImageSource(torch.utils.data.Dataset):
    def __init__(self, image_ids: Sequence[str], paths: dict[str, str]):
        self.image_ids = list(image_ids)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        path = self.paths.get(image_id)
        if path is None:
            raise ImageReadError(f"no image path known for image {image_id}")
        return image_id, str(path), torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


def _iter_images(image_ids: Sequence[str], paths: dict[str, str], num_workers: int,
                 pin: bool) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Decoded images in order; with ``num_workers`` DataLoader worker processes started now (forkserver where
    available: a forked worker would inherit the HDF5 files open in this process, and its copies of their locks
    make later opens of those files fail)."""
    ds = _ImageSource(image_ids, paths)
    if num_workers <= 0 or len(ds) == 0:
        return (ds[i] for i in range(len(ds)))
    import multiprocessing

    ctx = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin, prefetch_factor=4, multiprocessing_context=ctx)
    return iter(loader)



def prefer_channels_last(model: nn.Module, device: torch.device | str) -> bool:
    """Whether to run ``model`` in channels-last memory format: on CUDA (cuDNN's NHWC kernels), and on a CPU for
    networks with depthwise/grouped convolutions (efficientnet_lite0's batched forward runs faster channels-last
    there, VGG16's does not; docs/experiments.md)."""
    if torch.device(device).type == "cuda":
        return True
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


# -- the writer -----------------------------------------------------------------------------------------------
#: crops per forward/backward batch when none is given, by device type: on a CPU the batch's activations (and the
#: heap keep_freed_memory keeps for them) set the CAM stage's peak memory, and the smaller batch ran as fast per
#: crop (docs/results.md, "Memory"); on CUDA the earlier default
AUTO_BATCH_SIZE = {"cpu": 16, "cuda": 64}


def auto_batch_size(device: torch.device | str) -> int:
    """Crops per forward/backward batch of the CAM stage on ``device`` (:data:`AUTO_BATCH_SIZE`; the CPU's for
    other device types)."""
    return AUTO_BATCH_SIZE.get(torch.device(device).type, AUTO_BATCH_SIZE["cpu"])


@dataclass(frozen=True)
class CamStoreSettings:
    """How :func:`write_cam_store` computes and stores the maps (its keyword arguments are these fields)."""

    method: str = "sacam"  # a name of pipeline.cam_methods.CAM_METHODS
    layers: Sequence[str] | str | None = None  # CAM layers, all computed in one forward/backward pass and stored
    #                                           per layer (a comma-separated string or a sequence); None: the
    #                                           model's default CAM layer
    crop_size: int | None = None  # crops resized to this square; None: the model's input size
    batch_size: int = 0  # crops per forward/backward pass (cut across images; the last of a part smaller);
    #                      0: auto_batch_size(device)
    fusion: str = "sum"  # one of FUSIONS
    paste: str = "grid"  # one of PASTE_MODES: how a crop's map goes back onto its box (pipeline.cam_crops.paste_maps)
    inspect_images: int = 0  # the first that many images also store each crop's raw map (crop_maps)
    images_per_part: int = 64  # images per HDF5 part: the unit of resuming and of sharding
    shard: tuple[int, int] | None = None  # (i, n): compute only range i of n of the global plan's parts
    device: torch.device | str = "cpu"
    channels_last: bool | None = None  # memory format of model and crops; None: prefer_channels_last
    num_workers: int = 0  # image-decoding DataLoader workers
    compression: str = "gzip"
    compression_level: int = 1
    progress: bool = True
    stop_after_parts: int | None = None  # (tests) stop after writing that many new parts, as a kill would

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:  # before any work
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {FUSIONS}")
        if self.paste not in PASTE_MODES:
            raise ValueError(f"unknown paste mode {self.paste!r}; choose one of {PASTE_MODES}")
        layers = self.layer_names()
        if len(set(layers)) != len(layers):
            raise ValueError(f"CAM layers {layers}: each layer once")

    def layer_names(self, model: nn.Module | None = None) -> list[str]:
        """The CAM layers, in the given order (the model's default CAM layer when none are given)."""
        raw = self.layers.split(",") if isinstance(self.layers, str) else list(self.layers or ())
        names = [str(x).strip() for x in raw if str(x).strip()]
        if not names and model is not None:
            names = [getattr(model, "default_cam_layer", None) or "layer"]
        return names

    def shard_pair(self) -> tuple[int, int]:
        return (0, 1) if self.shard is None else (int(self.shard[0]), int(self.shard[1]))

    def recorded(self, model: nn.Module) -> dict:
        """The settings a store records (``plan.json``, ``summary.json``, each part's attributes), resolved for
        ``model``; the plan's digest covers them."""
        return {"method": self.method, "layers": self.layer_names(model),
                "crop_size": int(self.crop_size or getattr(model, "input_size", 224)),
                "batch_size": int(self.batch_size) if self.batch_size >= 1 else auto_batch_size(self.device),
                "fusion": self.fusion, **({"paste": self.paste} if self.paste != "resize" else {}),
                "inspect_images": self.inspect_images, "backbone": getattr(model, "name", type(model).__name__)}


def write_cam_store(model: nn.Module, entries: Sequence[CamEntry], image_paths: dict[str, str],
                    out_dir: str | os.PathLike, settings: CamStoreSettings | None = None, **options) -> CamStore:
    """Compute and store the fused CAM of every entry; resumable. ``settings`` (default
    :class:`CamStoreSettings`), with any of its fields overridden by keyword (``batch_size=8``).

    Images are processed in sorted id order, in parts of ``images_per_part`` images; each part is one HDF5 file
    ``cams-NNNNN.h5`` written atomically into ``out_dir``, and a part whose file exists is skipped, so a killed run
    resumes where it stopped and gives the same content as an uninterrupted one (batches never span parts). A
    ``plan.json`` records the work; stale parts from a different plan are removed. Per batch of ``batch_size``
    crops (cut across the images of a part): one forward and one backward. Writes ``index.csv`` and
    ``summary.json`` when all parts exist. Every entry also stores its crops' class probabilities (``crop_probs``).

    ``shard=(i, n)``: compute only the parts :func:`pipeline.cam_store.shard_parts` ``(n_parts, i, n)`` of the
    global plan of ``entries`` (which are all entries, in every shard), under their global part names; the
    directory is then a store of that shard's entries, and :func:`pipeline.cam_store.merge_cam_stores` joins the
    shards. A part's content does not depend on ``n`` (the same images, the same batches).
    """
    s = replace(settings or CamStoreSettings(), **options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device)
    model = model.to(device).eval()
    channels_last = prefer_channels_last(model, device) if s.channels_last is None else s.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    recorded, shard = s.recorded(model), s.shard_pair()
    plan = plan_parts(entries, s.images_per_part)
    mine = shard_parts(len(plan), *shard)
    _start_plan(out_dir, entries, plan, mine, recorded, s.images_per_part, shard)
    by_image: dict[str, list[CamEntry]] = {}
    for e in entries:
        by_image.setdefault(e.image_id, []).append(e)
    todo = [i for i in mine if not (out_dir / part_name(i)).exists()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d CAM parts already done; resuming", out_dir, len(mine) - len(todo), len(mine))

    total_crops = sum(len(e.crops) for i in todo for img in plan[i] for e in by_image[img])
    t0, n_crops = time.time(), 0
    with make_cam(s.method, model, layers=recorded["layers"]) as cam, tqdm(
            total=total_crops, unit="crop", desc=f"{s.method} CAMs", disable=not s.progress, smoothing=0.1) as bar:
        ctx = _PassContext(cam, recorded["crop_size"], model.mean, model.std, recorded["batch_size"], device,
                           memory_format, s.fusion, s.compression, s.compression_level,
                           set(sorted(by_image)[:s.inspect_images]), bar,
                           {n: layer_grid(model, n, recorded["crop_size"]) if s.paste == "grid" else None
                            for n in recorded["layers"]})
        images = _iter_images([img for i in todo for img in plan[i]], image_paths, s.num_workers,
                              pin=device.type == "cuda")
        for written, part in enumerate(todo, 1):
            n_crops += _write_part(ctx, out_dir / part_name(part), plan[part], images, by_image, recorded)
            if s.stop_after_parts is not None and written >= s.stop_after_parts and part != todo[-1]:
                log.info("%s: stopping after %d parts (stop_after_parts)", out_dir, written)
                return CamStore(out_dir)
    secs = time.time() - t0
    index = build_index(out_dir / part_name(i) for i in mine)
    write_csv(index, out_dir / "index.csv")
    summary = store_summary(recorded, index, len(mine), n_crops, secs, str(device), bool(channels_last))
    if shard != (0, 1):
        summary.update({"shard": shard[0], "n_shards": shard[1], "part_range": [mine.start, mine.stop],
                        "plan_parts": len(plan)})
    write_json(out_dir / "summary.json", summary)
    return CamStore(out_dir)


def _start_plan(out_dir: Path, entries: Sequence[CamEntry], plan: list[list[str]], mine: range, recorded: dict,
                images_per_part: int, shard: tuple[int, int]) -> None:
    """Write ``plan.json``; parts of an earlier, different plan in ``out_dir`` are removed first."""
    record = plan_record(partition_digest(entries, images_per_part), recorded, shard, len(plan), len(entries),
                         int(images_per_part), mine)
    plan_path = out_dir / "plan.json"
    if plan_path.exists() and read_json(plan_path).get("digest") != record["digest"]:
        log.warning("%s: CAM parts from a different plan found; recomputing", out_dir)
        for p in out_dir.glob("cams-*.h5"):
            p.unlink()
    write_json(plan_path, record)


# -- one part: batches of crops ------------------------------------------------------------------------------
@dataclass
class _PassContext:
    """What every batch of one :func:`write_cam_store` call shares."""

    cam: BaseCAM
    crop_size: int
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int
    device: torch.device
    memory_format: torch.memory_format
    fusion: str
    compression: str
    compression_level: int
    inspect: set  # image ids whose crops' maps are stored too
    bar: tqdm
    grids: dict  # layer -> its MapGrid (None: pasted as an image resize)


def _write_part(ctx: _PassContext, path: Path, image_ids: list[str], images: Iterator, by_image: dict,
                recorded: dict) -> int:
    """Compute one part (the next ``len(image_ids)`` images of ``images``) into ``path``, atomically; returns the
    number of crops. The part's crops, in entry order, go through forward/backward batches of exactly
    ``ctx.batch_size`` crops, cut across images (the last batch of the part smaller): :class:`_CropQueue`."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs.update({"format": STORE_FORMAT, **{k: str(v) for k, v in recorded.items() if k != "layers"},
                        "layers": json.dumps(recorded["layers"])})
        queue = _CropQueue(ctx, f)
        for _ in image_ids:
            image_id, img_path, img = next(images)
            ents = by_image[image_id]
            _check_size(img, ents, img_path)
            queue.add(image_id, img, ents)
        queue.finish()
    return queue.n_crops


def _check_size(img: torch.Tensor, ents: list[CamEntry], path: str) -> None:
    h, w = img.shape[-2:]
    for e in ents:
        if len(e.crops) == 0:
            raise ValueError(f"{e.kind} {e.entry_id} of image {e.image_id} has no crops")
        c = e.crops
        if (c[:, 0] < -1).any() or (c[:, 1] < -1).any() or (c[:, 2] > w + 1).any() or (c[:, 3] > h + 1).any():
            raise ValueError(f"{path}: image is {w}x{h} but {e.kind} {e.entry_id} has a crop outside it: "
                             f"{c.tolist()}")


class _CropQueue:
    """The crops of one part's images in arrival order, computed in forward/backward batches of exactly
    ``ctx.batch_size`` crops as soon as that many are waiting (so image decoding in DataLoader workers overlaps the
    batches), the rest in one smaller batch at :meth:`finish`; an image's entries are pasted, fused
    (``ctx.fusion``) and stored once all its crops have maps (one map per CAM layer, all from the same pass; the
    fusion weights, from the crops' class probabilities, are the same for every layer).

    Why one batch size: :func:`pipeline.device.keep_freed_memory` keeps freed blocks in the heap, and batches of
    one size allocate the same tensors every time, so the heap is reused; passes that ended at image boundaries
    varied in size, and the kept heap grew with the sizes it had seen (docs/results.md, "Memory"). A crop's map
    does not depend on the batch it is computed in (tests/test_cam.py)."""

    def __init__(self, ctx: _PassContext, f: h5py.File):
        self.ctx, self.f = ctx, f
        self.images: list[tuple[str, torch.Tensor, list[CamEntry], int]] = []  # not stored yet: id, image, crops
        self.todo: list[tuple[int, np.ndarray, int]] = []  # crops without maps: (index in images, box, class)
        self.first = 0  # self.images[0]'s index among the part's images
        self.maps: dict[str, list[torch.Tensor]] = {n: [] for n in ctx.cam.layers}  # per layer: maps (and
        #                                   probabilities) of the crops of self.images computed so far
        self.probs: list[torch.Tensor] = []
        self.n_crops = 0

    def add(self, image_id: str, img: torch.Tensor, ents: list[CamEntry]) -> None:
        j = self.first + len(self.images)
        crops = [(j, box, e.class_index) for e in ents for box in np.asarray(e.crops, np.float32)]
        self.images.append((image_id, img.to(self.ctx.device, non_blocking=True), ents, len(crops)))
        self.todo += crops
        while len(self.todo) >= self.ctx.batch_size:
            self._batch(self.ctx.batch_size)
        self._store_finished()

    def finish(self) -> None:
        while self.todo:
            self._batch(min(self.ctx.batch_size, len(self.todo)))
        self._store_finished()

    def _batch(self, n: int) -> None:
        ctx, batch, self.todo = self.ctx, self.todo[:n], self.todo[n:]
        owners = [j for j, _, _ in batch]
        x = torch.cat([extract_crops(self.images[j - self.first][1],
                                     np.stack([box for o, box, _ in batch if o == j]), ctx.crop_size, ctx.mean,
                                     ctx.std) for j in dict.fromkeys(owners)]).contiguous(
            memory_format=ctx.memory_format)
        t = torch.tensor([c for _, _, c in batch], dtype=torch.long, device=ctx.device)
        for layer, m in ctx.cam.forward_layers(x, t).items():
            self.maps[layer].append(m)
        self.probs.append(torch.softmax(ctx.cam.outputs.float(), 1).gather(1, t[:, None])[:, 0])
        ctx.bar.update(n)

    def _store_finished(self) -> None:
        """Store the leading images whose crops all have maps."""
        done = sum(len(p) for p in self.probs)
        if not self.images or self.images[0][3] > done:
            return
        maps, probs = {n: torch.cat(m) for n, m in self.maps.items()}, torch.cat(self.probs)
        k = 0
        while self.images and k + self.images[0][3] <= done:
            image_id, gimg, ents, n = self.images.pop(0)
            self.first += 1
            hw = tuple(gimg.shape[-2:])
            for e in ents:
                p = probs[k:k + len(e.crops)]
                weights = fusion_weights(self.ctx.fusion, p)
                m = {n: lm[k:k + len(e.crops)] for n, lm in maps.items()}
                k += len(e.crops)
                fused = {n: paste_maps(lm, e.crops, hw, weights, self.ctx.grids[n]).cpu().numpy()
                         for n, lm in m.items()}
                _store_entry(self.ctx, self.f, e, fused, p, m if image_id in self.ctx.inspect else None)
            self.n_crops += n
        self.maps, self.probs = {n: [lm[k:]] for n, lm in maps.items()}, [probs[k:]]


def _store_entry(ctx: _PassContext, f: h5py.File, e: CamEntry, fused: dict[str, np.ndarray], probs: torch.Tensor,
                 crop_maps: dict[str, torch.Tensor] | None) -> None:
    """One entry's group: ``maps/<layer>`` (the fused map of each layer), ``crops``, ``crop_probs`` and, for
    inspected images, ``crop_maps/<layer>`` (layout: :mod:`pipeline.cam_store`)."""
    g = f.create_group(str(e.entry_id))
    maps = g.create_group("maps", track_order=True)
    for layer, m in fused.items():
        store_map(maps, layer, m, ctx.compression, ctx.compression_level)
    g.create_dataset("crops", data=np.asarray(e.crops, np.float32), track_times=False)
    g.create_dataset("crop_probs", data=probs.cpu().numpy().astype(np.float32), track_times=False)
    g.attrs.update({"kind": e.kind, "image_id": e.image_id, "class": e.cls,
                    "class_index": int(e.class_index), "x": float(e.x), "y": float(e.y)})
    if crop_maps is not None:
        cg = g.create_group("crop_maps", track_order=True)
        for layer, m in crop_maps.items():
            store_map(cg, layer, m.cpu().numpy(), ctx.compression, ctx.compression_level)
