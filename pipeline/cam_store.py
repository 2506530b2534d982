"""The CAM store: its layout, the global plan of parts and its shards, the reader, the merger of shards, and the
fusion of several stores' maps.

A store directory holds HDF5 parts ``cams-NNNNN.h5`` (format :data:`STORE_FORMAT`, attributes ``format`` and
``layers``, a JSON list; one group per entry: ``maps/<layer>``, the fused map of each CAM layer as float16 with a
``scale`` attribute, all layers from the same forward/backward pass, the ``crops``, their ``crop_probs`` and, for
inspected images, each crop's ``crop_maps/<layer>``), ``plan.json`` (what the parts hold), ``index.csv``
(:data:`INDEX_COLUMNS`, one row per entry) and ``summary.json``. :func:`pipeline.cam_writer.write_cam_store` writes
one; :class:`CamStore` reads it back, one layer per reader object (``CamStore(dir, layer)``).

Sharding: the parts of one global plan (all entries, sorted image ids, ``images_per_part``) are split into
contiguous ranges (:func:`shard_parts`); a shard computes its range into a directory of its own (a store of its
entries), and :func:`merge_cam_stores` publishes the shards' parts as one store (hard links, an index over all
parts). A part holds the same maps whatever the number of shards (passes never span parts).

:class:`FusedMaps` reads one map per click from several readers (the CAM layers of ``--cam-layers``, from one
store per backbone, and the ``--cam-ensemble`` members) and averages them (:func:`pipeline.boxes.ensemble_map`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from .boxes import ensemble_map
from .io import atomic_path, read_json, write_csv, write_json
from .sharding import shard_bounds

log = logging.getLogger(__name__)

#: 2: one map per CAM layer (``maps/<layer>``); 1 (before): one ``map`` per entry, one store per layer
STORE_FORMAT = 2
INDEX_COLUMNS = ["entry_id", "kind", "image_id", "class", "class_index", "x", "y", "n_crops", "height", "width",
                 "part"]
#: settings every shard of one store must share (``batch_size`` may differ: it only changes how many crops go
#: through the network at once, not what is computed)
SHARED_SETTINGS = ("method", "layers", "crop_size", "fusion", "inspect_images", "backbone")


# -- the plan: parts and shards -------------------------------------------------------------------------------
def plan_parts(entries: Sequence, images_per_part: int) -> list[list[str]]:
    """The global plan: the entries' image ids, sorted, in parts of ``images_per_part``."""
    images = sorted({e.image_id for e in entries})
    return [images[i:i + images_per_part] for i in range(0, len(images), images_per_part)]


def partition_digest(entries: Sequence, images_per_part: int) -> str:
    """What the global plan's parts hold: the entries (ids, images, classes, clicks, crops) and the part size."""
    h = hashlib.md5(json.dumps({"ipp": images_per_part}).encode())
    for e in sorted(entries, key=lambda e: (e.image_id, e.entry_id)):
        h.update(f"{e.entry_id}|{e.kind}|{e.image_id}|{e.class_index}|{e.x!r}|{e.y!r}|".encode())
        h.update(np.ascontiguousarray(e.crops, np.float32).tobytes())
    return h.hexdigest()


def plan_digest(partition: str, settings: dict, shard: tuple[int, int]) -> str:
    blob = json.dumps({"partition": partition, "settings": settings, "shard": list(shard)}, sort_keys=True)
    return hashlib.md5(blob.encode()).hexdigest()


def plan_record(partition: str, settings: dict, shard: tuple[int, int], parts: int, entries: int,
                images_per_part: int | None, part_range: range, **extra) -> dict:
    """The content of a store's ``plan.json`` (``extra`` goes before the settings)."""
    return {"digest": plan_digest(partition, settings, shard), "partition": partition, "parts": parts,
            "entries": entries, "images_per_part": images_per_part, "shard": shard[0], "n_shards": shard[1],
            "part_range": [part_range.start, part_range.stop], **extra, **settings}


def shard_parts(n_parts: int, shard: int, n_shards: int) -> range:
    """The global part indices of shard ``shard`` of ``n_shards``: contiguous, near-equal ranges (an empty range
    when there are fewer parts than shards)."""
    start, stop = shard_bounds(n_parts, shard, n_shards)
    return range(start, stop)


def part_name(i: int) -> str:
    return f"cams-{i:05d}.h5"


# -- maps, index, summary -------------------------------------------------------------------------------------
def store_map(group: h5py.Group, name: str, arr: np.ndarray, compression: str, level: int | None) -> float:
    """Store a raw float32 map as float16 of ``arr / scale`` (scale = max |arr|, kept as an attribute) so that no
    value overflows or underflows float16; returns scale."""
    arr = np.asarray(arr, dtype=np.float32)
    scale = float(np.abs(arr).max()) if arr.size else 0.0
    data = (arr / scale if scale > 0 else arr).astype(np.float16)
    chunks = data.shape if data.ndim == 2 else (1,) + data.shape[1:]
    opts = {"compression": compression, "compression_opts": level} if compression == "gzip" else (
        {"compression": compression} if compression else {})
    ds = group.create_dataset(name, data=data, chunks=chunks, shuffle=bool(compression), track_times=False, **opts)
    ds.attrs["scale"] = np.float32(scale)
    return scale


def read_map(ds: h5py.Dataset) -> np.ndarray:
    return ds[()].astype(np.float32) * np.float32(ds.attrs["scale"] or 1.0)


def check_part_format(f: h5py.File, path: str | os.PathLike) -> list[str]:
    """The CAM layers of an open part, after checking it is of :data:`STORE_FORMAT` (a ``ValueError`` naming the
    file otherwise)."""
    fmt = f.attrs.get("format")
    if fmt is None or int(fmt) != STORE_FORMAT:
        raise ValueError(f"{path}: CAM store part of format {fmt}, this version reads format {STORE_FORMAT} (one map "
                         "per CAM layer, all layers of a backbone in one store); recompute the CAM stage, e.g. "
                         "make rerun STAGE=GenerateCAMsShard")
    return list(json.loads(f.attrs["layers"]))


def build_index(parts: Iterable[Path]) -> pd.DataFrame:
    rows = []
    for path in parts:
        with h5py.File(path, "r") as f:
            layers = check_part_format(f, path)
            for key, g in f.items():
                a = g.attrs
                h, w = g["maps"][layers[0]].shape
                rows.append((int(key), str(a["kind"]), str(a["image_id"]), str(a["class"]), int(a["class_index"]),
                             float(a["x"]), float(a["y"]), int(g["crops"].shape[0]), h, w, path.name))
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def store_summary(settings: dict, index: pd.DataFrame, parts: int, computed_crops: int, seconds: float,
                  device: str, channels_last: bool) -> dict:
    """The content of a store's ``summary.json``: its settings, counts and the timing of the run that wrote it."""
    return {**settings, "entries": len(index), "images": int(index.image_id.nunique()) if len(index) else 0,
            "crops": int(index.n_crops.sum()) if len(index) else 0, "parts": parts,
            "computed_crops": computed_crops, "seconds": round(seconds, 3),
            "crops_per_s": round(computed_crops / seconds, 2) if seconds > 0 and computed_crops else None,
            "device": device, "channels_last": channels_last}


# -- merging shards -------------------------------------------------------------------------------------------
def merge_cam_stores(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> "CamStore":
    """Publish the shards written by ``write_cam_store(..., shard=(i, n))`` as one store in ``out_dir``.

    Each shard's parts are hard-linked into ``out_dir`` under their global names (copied where hard links are not
    possible; the maps are never rewritten), ``index.csv`` is the shards' indexes in part order and
    ``summary.json`` adds up their counts and timings, so the result reads exactly like a store written in one go.
    Raises ``ValueError`` naming the shard directory when a shard is unfinished, comes from another plan (other
    entries, part size or CAM settings) or the shards do not cover every part of the plan exactly once.
    """
    out_dir = Path(out_dir)
    dirs = [Path(d) for d in shard_dirs]
    plans = _shard_plans(dirs)
    ref = plans[0]
    order = _shard_order(dirs, plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    indexes, summaries, how = [], [], {"link": 0, "copy": 0, "kept": 0}
    for k in order:
        indexes.append(_link_shard(dirs[k], plans[k], out_dir, how))
        summaries.append(read_json(dirs[k] / "summary.json"))
    index = _merged_index(indexes, dirs, int(ref["entries"]))
    write_csv(index, out_dir / "index.csv")
    batch_sizes = sorted({int(p["batch_size"]) for p in plans})
    settings = {k: ref[k] for k in SHARED_SETTINGS if k in ref}
    settings["batch_size"] = batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes
    write_json(out_dir / "plan.json", plan_record(ref["partition"], settings, (0, 1), ref["parts"], ref["entries"],
                                                  ref.get("images_per_part"), range(0, ref["parts"]),
                                                  merged_from=len(dirs)))
    computed = sum(int(s.get("computed_crops") or 0) for s in summaries)
    secs = sum(float(s.get("seconds") or 0.0) for s in summaries)
    summary = store_summary(settings, index, int(ref["parts"]), computed, secs,
                            ",".join(sorted({str(s.get("device")) for s in summaries})),
                            all(bool(s.get("channels_last")) for s in summaries))
    summary.update({"shards": len(dirs), "parts_linked": how["link"] + how["kept"], "parts_copied": how["copy"]})
    write_json(out_dir / "summary.json", summary)
    log.info("%s: merged %d CAM shards, %d parts (%d linked, %d copied), %d entries", out_dir, len(dirs),
             ref["parts"], how["link"] + how["kept"], how["copy"], len(index))
    return CamStore(out_dir)


def _shard_plans(dirs: list[Path]) -> list[dict]:
    """The shards' ``plan.json``, checked: every shard finished, all from one plan with the same settings."""
    if not dirs:
        raise ValueError("merge_cam_stores: no shard directories given")
    plans = []
    for d in dirs:
        for name in ("plan.json", "index.csv", "summary.json"):
            if not (d / name).is_file():
                raise ValueError(f"{d}: not a finished CAM shard (no {name})")
        plans.append(read_json(d / "plan.json"))
    ref, ref_dir = plans[0], dirs[0]
    for d, p in zip(dirs, plans):
        if p.get("partition") != ref.get("partition") or p.get("parts") != ref.get("parts"):
            raise ValueError(f"{d}: CAM shard from another plan than {ref_dir} (other entries or images per part); "
                             "recompute that shard")
        diff = {k: (p.get(k), ref.get(k)) for k in SHARED_SETTINGS if p.get(k) != ref.get(k)}
        if diff:
            raise ValueError(f"{d}: CAM shard computed with other settings than {ref_dir}: {diff}")
    return plans


def _shard_order(dirs: list[Path], plans: list[dict]) -> list[int]:
    """The shards in part order, checked to cover every part of the plan exactly once."""
    order = sorted(range(len(dirs)), key=lambda k: (plans[k]["part_range"][0], plans[k]["part_range"][1]))
    covered = [i for k in order for i in range(*plans[k]["part_range"])]
    if covered != list(range(int(plans[0]["parts"]))):
        raise ValueError(f"CAM shards {[str(dirs[k]) for k in order]} cover parts {covered}, not each of the plan's "
                         f"{plans[0]['parts']} parts exactly once")
    return order


def _link_shard(shard_dir: Path, plan: dict, out_dir: Path, how: dict) -> pd.DataFrame:
    """Link (or copy) one shard's parts into ``out_dir`` (counted in ``how``); returns the shard's index."""
    names = [part_name(i) for i in range(*plan["part_range"])]
    for name in names:
        src = shard_dir / name
        if not src.is_file():
            raise ValueError(f"{shard_dir}: CAM shard lacks its part {name}")
        how[_link_or_copy(src, out_dir / name)] += 1
    idx = pd.read_csv(shard_dir / "index.csv", dtype={"image_id": str, "part": str})
    if len(idx) and not set(idx.part) <= set(names):
        raise ValueError(f"{shard_dir}/index.csv names parts outside the shard's range {plan['part_range']}")
    return idx


def _merged_index(indexes: list[pd.DataFrame], dirs: list[Path], n_entries: int) -> pd.DataFrame:
    indexes = [i for i in indexes if len(i)]  # (empty shards: fewer parts than shards)
    index = pd.concat(indexes, ignore_index=True) if indexes else pd.DataFrame(columns=INDEX_COLUMNS)
    dup = index.entry_id[index.entry_id.duplicated()]
    if len(dup):
        raise ValueError(f"CAM shards {[str(d) for d in dirs]} both hold entries {sorted(set(dup))[:10]}")
    if len(index) != n_entries:
        raise ValueError(f"CAM shards hold {len(index)} entries, the plan has {n_entries}")
    return index


def _link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` a hard link of ``src`` (a copy, written atomically, where the filesystem has no hard links
    between the two); returns "link", "copy" or "kept" (already the same file)."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return "kept"
        dst.unlink()
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return "copy"


# -- reading --------------------------------------------------------------------------------------------------
class CamStore:
    """Reader of one CAM layer of a CAM store directory (``index.csv`` + ``cams-*.h5``); HDF5 files are opened
    lazily on first access (and not pickled, so a store can be handed to DataLoader workers).

    ``layer``: which of the store's layers :meth:`load` reads (``None``: the store's first layer, the only one of a
    one-layer store); :attr:`layers` lists them. ``load(entry_id) -> (fused map float32 (H, W), meta)`` with meta
    keys ``entry_id, kind, image_id, class, class_index, x, y, crops (N, 4), crop_probs (N,)`` (the classifier's
    probability of the class on each crop); in click mode entry ids are click ids.
    """

    def __init__(self, stage_dir: str | os.PathLike, layer: str | None = None):
        self.dir = Path(stage_dir)
        self._files: dict[str, h5py.File] = {}
        self._index: pd.DataFrame | None = None
        self._layers: list[str] | None = None
        self._layer = layer

    @property
    def layers(self) -> list[str]:
        """The store's CAM layers, in the order they were requested."""
        if self._layers is None:
            plan = self.dir / "plan.json"
            if plan.is_file() and "layers" in (rec := read_json(plan)):
                self._layers = list(rec["layers"])
            else:
                parts = sorted(self.dir.glob("cams-*.h5"))
                if not parts:
                    raise FileNotFoundError(f"{self.dir}: no CAM store here (no plan.json, no cams-*.h5)")
                with h5py.File(parts[0], "r") as f:
                    self._layers = check_part_format(f, parts[0])
        return self._layers

    @property
    def layer(self) -> str:
        """The layer :meth:`load` reads."""
        if self._layer is None:
            return self.layers[0]
        if self._layer not in self.layers:
            raise KeyError(f"{self.dir}: the CAM store has no layer {self._layer!r}; it holds {self.layers}")
        return self._layer

    def with_layer(self, layer: str | None) -> "CamStore":
        """A reader of another layer of the same store (its own open files)."""
        view = CamStore(self.dir, layer)
        view._index, view._layers = self._index, self._layers
        return view

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            path = self.dir / "index.csv"
            if path.is_file():
                self._index = pd.read_csv(path, dtype={"image_id": str, "part": str})
            else:  # an unfinished store (work dir): list the parts present
                parts = sorted(self.dir.glob("cams-*.h5"))
                if not parts:
                    raise FileNotFoundError(f"{self.dir}: no CAM store here (no index.csv, no cams-*.h5)")
                self._index = build_index(parts)
            self._index = self._index.set_index("entry_id", drop=False)
        return self._index

    def click_ids(self) -> list[int]:
        """All entry ids (click ids in click mode), in storage order."""
        return [int(i) for i in self.index.entry_id]

    entry_ids = click_ids

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, entry_id: int) -> bool:
        return int(entry_id) in self.index.index

    def _group(self, entry_id: int) -> h5py.Group:
        try:
            part = self.index.at[int(entry_id), "part"]
        except KeyError:
            raise KeyError(f"{self.dir}: no CAM entry {entry_id}") from None
        f = self._files.get(part)
        if f is None:
            f = h5py.File(self.dir / part, "r")
            try:
                check_part_format(f, self.dir / part)
            except ValueError:
                f.close()
                raise
            self._files[part] = f
        return f[str(int(entry_id))]

    def load(self, entry_id: int) -> tuple[np.ndarray, dict]:
        g = self._group(entry_id)
        a = g.attrs
        crops = g["crops"][()]
        probs = g["crop_probs"][()] if "crop_probs" in g else np.full(len(crops), np.nan, np.float32)
        meta = {"entry_id": int(entry_id), "kind": str(a["kind"]), "image_id": str(a["image_id"]),
                "class": str(a["class"]), "class_index": int(a["class_index"]), "x": float(a["x"]),
                "y": float(a["y"]), "crops": crops, "crop_probs": probs}
        return read_map(g["maps"][self.layer]), meta

    def load_crop_maps(self, entry_id: int) -> np.ndarray | None:
        """Each crop's raw map ``(N, h, w)`` at :attr:`layer` for entries of inspected images, else None."""
        g = self._group(entry_id)
        return read_map(g["crop_maps"][self.layer]) if "crop_maps" in g else None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "CamStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "_files": {}, "_index": self._index, "_layers": self._layers, "_layer": self._layer}

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


# -- several stores -------------------------------------------------------------------------------------------
class FusedMaps:
    """One map per click from several CAM store readers (each a :class:`CamStore` bound to one layer: the layers of
    ``--cam-layers``, the ``--cam-ensemble`` members): the one reader's map, or the mean of all their maps, each
    scaled to a maximum of 1
    (:func:`pipeline.boxes.ensemble_map`; a missing or unusable map is left out of the mean).

    The first store is the main one: its metadata is returned, and in the image-label-only mode its entries are
    the ones iterated. ``partial`` counts the clicks of :meth:`items` that some but not all stores have a usable
    map of. A context manager that closes its stores on exit.
    """

    def __init__(self, stores: Sequence[CamStore]):
        if not stores:
            raise ValueError("FusedMaps: no CAM stores given")
        self.stores = list(stores)
        self.partial = 0

    @property
    def main(self) -> CamStore:
        return self.stores[0]

    @property
    def image_mode(self) -> bool:
        """Whether the main store holds whole-image entries only (the image-label-only baseline)."""
        return set(self.main.index["kind"]) == {"image"}

    def load(self, entry_id: int) -> tuple[np.ndarray | None, int, dict | None]:
        """``(fused map or None, how many stores' maps it uses, the main store's metadata or None)``."""
        loaded = [s.load(entry_id) if entry_id in s else (None, None) for s in self.stores]
        maps = [m for m, _ in loaded]
        fused, used = ensemble_map(maps) if len(maps) > 1 else (maps[0], int(maps[0] is not None))
        return fused, used, loaded[0][1]

    def load_map(self, entry_id: int) -> np.ndarray | None:
        """The fused map alone (the report's ``load_map``)."""
        return self.load(entry_id)[0]

    def items(self, clicks: pd.DataFrame) -> tuple[Iterator[tuple[int, np.ndarray | None, dict]], int]:
        """``(entry_id, fused map or None, meta)`` for :func:`pipeline.boxes.pseudo_boxes_from_cams`, and their
        number: the main store's entries in the image-label-only mode, else every click of ``clicks``
        (``click_id, image_id, class, x, y``; a click without a map gets None: "missing", its fallback)."""
        if self.image_mode:
            ids = self.main.click_ids()
            return ((i, fused, meta) for i in ids for fused, _, meta in [self.load(i)]), len(ids)
        return self._click_items(clicks), len(clicks)

    def _click_items(self, clicks: pd.DataFrame) -> Iterator[tuple[int, np.ndarray | None, dict]]:
        for cid, image_id, cls, x, y in clicks[["click_id", "image_id", "class", "x", "y"]].itertuples(
                index=False, name=None):
            fused, used, _ = self.load(cid)
            self.partial += 0 < used < len(self.stores)
            yield int(cid), fused, {"image_id": image_id, "class": cls, "x": x, "y": y}

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def __enter__(self) -> "FusedMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
