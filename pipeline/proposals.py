"""Stage 1: object proposals (OpenCV contrib selective search), their HDF5 store, and importers.

Boxes are float32 ``(x1, y1, x2, y2)`` in 0-based continuous coordinates of the original image (see
docs/architecture.md), inside the image, deduplicated and sorted lexicographically: OpenCV returns the same set
in a different order on every run, so the sorted set is the canonical, reproducible form.

Store layout (one HDF5 file per split, written atomically), read with :class:`ProposalStore`:

    boxes      (sum K, 4) float32   all images' boxes, concatenated in image order
    offsets    (n + 1,)   int64     boxes of image i are boxes[offsets[i]:offsets[i + 1]]
    image_ids  (n,)       str
    sizes      (n, 2)     int32     (width, height) of the original image
    attrs: format, version, box_format, params_json (the parameters that made the boxes), and each scalar
           parameter as its own attribute.

Precomputed proposals are imported into the same store (:func:`import_proposals`): the Fast R-CNN release's
``.mat`` files (``(y1, x1, y2, x2)``, 1-based inclusive) and a plain ``.npz``/``.h5`` layout in our convention.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from .imageio import read_image
from .io import atomic_path
from .sharding import shard_bounds  # noqa: F401 (re-exported: tasks.proposals, detector, distributed)

log = logging.getLogger(__name__)

MODES = ("fast", "quality")
SOURCES = ("selective_search", "mat", "npz", "h5")
#: boxes narrower or shorter than this many original-image pixels are dropped (R-CNN's selective search used 20)
DEFAULT_MIN_SIZE = 20.0
STORE_FORMAT = "clickscale-proposals"
STORE_VERSION = 1
BOX_FORMAT = "x1,y1,x2,y2 float32, 0-based continuous original-image coordinates"


class ProposalFileError(ValueError):
    """A proposal file (store or import) is missing, malformed, or does not cover the images asked for."""


# ---------------------------------------------------------------------------------------------------------------
# selective search on one image
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectiveSearchParams:
    """Everything that determines the proposals of an image (stored as the HDF5 file's attributes)."""

    mode: str = "fast"
    max_side: int = 500
    min_size: float = DEFAULT_MIN_SIZE
    max_boxes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"selective search mode must be one of {MODES}, got {self.mode!r}")
        if self.max_side is not None and self.max_side <= 0:
            raise ValueError(f"max_side must be positive (or None for no cap), got {self.max_side}")
        if self.max_boxes is not None and self.max_boxes <= 0:
            raise ValueError(f"max_boxes must be positive (or None for no cap), got {self.max_boxes}")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "max_side": self.max_side, "min_size": float(self.min_size),
                "max_boxes": self.max_boxes, "seed": self.seed}


def resize_for_proposals(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image with its longest side capped at ``max_side`` (never enlarged); INTER_AREA resampling."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def raw_selective_search(image_bgr: np.ndarray, mode: str = "fast") -> np.ndarray:
    """The bare OpenCV call: int32 ``(K, 4)`` rects ``(x, y, w, h)`` in the given image, in OpenCV's order."""
    if mode not in MODES:
        raise ValueError(f"selective search mode must be one of {MODES}, got {mode!r}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image_bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    rects = ss.process()
    return np.asarray(rects, dtype=np.int32).reshape(-1, 4)


def postprocess_boxes(boxes: np.ndarray, width: int, height: int, min_size: float = DEFAULT_MIN_SIZE,
                      max_boxes: int | None = None, seed: int = 0) -> np.ndarray:
    """Canonical form of a proposal set: clip into the image, drop boxes with a side < ``min_size``, remove
    duplicates, sort lexicographically by ``(x1, y1, x2, y2)``; then, if more than ``max_boxes`` remain, keep a
    seeded random subset of ``max_boxes`` of them (in sorted order).

    The subset is random rather than the first ``max_boxes`` of the sorted list, which would keep only boxes
    at the left of the image. Returns float32 ``(K, 4)``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if b.size and not np.isfinite(b).all():
        raise ValueError("proposal boxes contain NaN or infinite coordinates")
    b = np.column_stack([np.clip(b[:, 0], 0, width), np.clip(b[:, 1], 0, height),
                         np.clip(b[:, 2], 0, width), np.clip(b[:, 3], 0, height)]).astype(np.float32)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size) & \
           (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b = b[keep]
    if len(b) == 0:
        return np.zeros((0, 4), np.float32)
    b = np.unique(b, axis=0)  # sorted lexicographically, duplicates removed
    if max_boxes is not None and len(b) > max_boxes:
        idx = np.sort(np.random.default_rng(seed).choice(len(b), size=max_boxes, replace=False))
        b = b[idx]
    return np.ascontiguousarray(b, dtype=np.float32)


def selective_search(image_rgb: np.ndarray, mode: str = "fast", max_side: int | None = 500,
                     min_size: float = DEFAULT_MIN_SIZE, max_boxes: int | None = None, seed: int = 0) -> np.ndarray:
    """Selective-search proposals of an RGB uint8 image, as float32 ``(K, 4)`` boxes in original coordinates.

    The image is downscaled so its longest side is at most ``max_side`` before the OpenCV call; boxes are mapped
    back with the exact per-axis scale (a rect covering the whole small image covers the whole original).
    See :func:`postprocess_boxes` for the filtering, ordering and ``max_boxes`` subset.
    """
    params = SelectiveSearchParams(mode, max_side, min_size, max_boxes, seed)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"selective_search wants an HxWx3 RGB image, got shape {image_rgb.shape}")
    h, w = image_rgb.shape[:2]
    small = resize_for_proposals(image_rgb, params.max_side)
    rects = raw_selective_search(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), params.mode).astype(np.float64)
    sx, sy = w / small.shape[1], h / small.shape[0]
    boxes = np.column_stack([rects[:, 0] * sx, rects[:, 1] * sy,
                             (rects[:, 0] + rects[:, 2]) * sx, (rects[:, 1] + rects[:, 3]) * sy])
    return postprocess_boxes(boxes, w, h, params.min_size, params.max_boxes, params.seed)


# ---------------------------------------------------------------------------------------------------------------
# many images, in processes
# ---------------------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    cv2.setNumThreads(1)


def _proposals_for_path(job: tuple[str, dict]) -> tuple[np.ndarray, tuple[int, int]]:
    path, params = job
    image = read_image(path)
    return selective_search(image, **params), (int(image.shape[1]), int(image.shape[0]))


def _mp_context():
    # forkserver: workers fork from a clean single-threaded server process. A plain fork of the calling process
    # copies the locks its other threads hold (OpenCV's, torch's, a luigi worker's), and the children can wait on
    # them forever (seen in the test suite once every stage forked workers). spawn where forkserver does not exist.
    # The server imports this module once (preload), so each worker starts without importing OpenCV again.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def iter_proposals(paths: Sequence[str | os.PathLike], params: SelectiveSearchParams | None = None,
                   workers: int = 1, progress: bool = True, desc: str = "selective search",
                   ) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """``(boxes, (width, height))`` for each image path, in the order of ``paths``.

    ``workers`` > 1 spreads images over that many processes (each with one OpenCV thread), 0 over one per core
    this process may use (:func:`available_cores`); the results do not depend on ``workers``. The processes start
    from a forkserver (spawn where there is none), so a script that calls this with ``workers != 1`` needs the
    usual ``if __name__ == "__main__":`` guard. Read errors name the file (:class:`pipeline.imageio.ImageReadError`).
    """
    params = params or SelectiveSearchParams()
    jobs = [(str(p), params.as_dict()) for p in paths]
    workers = available_cores() if workers == 0 else workers
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers <= 1 or len(jobs) <= 1:
            previous = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                for job in jobs:
                    yield _proposals_for_path(job)
                    bar.update()
            finally:
                cv2.setNumThreads(previous)
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_mp_context(),
                                       initializer=_init_worker)
            try:
                for result in pool.map(_proposals_for_path, jobs, chunksize=1):
                    yield result
                    bar.update()
            finally:  # on an error or an early close, do not compute the remaining images
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def compute_proposals(paths: Sequence[str | os.PathLike], params: SelectiveSearchParams | None = None,
                      workers: int = 1, progress: bool = True) -> list[np.ndarray]:
    """Boxes of every image path (see :func:`iter_proposals`)."""
    return [boxes for boxes, _ in iter_proposals(paths, params, workers, progress)]


def run_proposal_shard(image_ids: Sequence[str], paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                       params: SelectiveSearchParams | None = None, workers: int = 1,
                       checkpoint_dir: str | os.PathLike | None = None, chunk_size: int = 50,
                       attrs: Mapping[str, Any] | None = None, progress: bool = True) -> Path:
    """Selective search over a list of images into the store ``out_path``.

    With ``checkpoint_dir``, every ``chunk_size`` images are saved there as a small store as soon as they are
    done; a rerun after a kill skips the chunks already saved (same images, same parameters) and only computes
    the rest. The chunk files are removed once ``out_path`` is written.
    """
    params = params or SelectiveSearchParams()
    if len(image_ids) != len(paths):
        raise ValueError(f"{len(image_ids)} image ids but {len(paths)} paths")
    store_attrs = {"source": "selective_search", **params.as_dict(), **dict(attrs or {})}
    if checkpoint_dir is None:
        results = list(iter_proposals(paths, params, workers, progress))
        write_proposal_store(out_path, ((i, b, s) for i, (b, s) in zip(image_ids, results)), store_attrs)
        return Path(out_path)

    ckpt = Path(checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    chunks = [(i, min(i + chunk_size, len(image_ids))) for i in range(0, len(image_ids), chunk_size)]
    chunk_files = [ckpt / f"chunk_{k:05d}.h5" for k in range(len(chunks))]
    todo = [(start, stop, f) for (start, stop), f in zip(chunks, chunk_files)
            if not (f.exists() and _chunk_is_valid(f, image_ids[start:stop], store_attrs))]
    if len(todo) < len(chunks):
        log.info("%s: %d of %d chunks already done, resuming", out_path, len(chunks) - len(todo), len(chunks))
    todo_idx = [i for start, stop, _ in todo for i in range(start, stop)]
    results = iter_proposals([paths[i] for i in todo_idx], params, workers, progress)
    try:
        for start, stop, f in todo:
            # a chunk is collected in memory and written in one go: no HDF5 file is open while the worker pool
            # starts (forked workers would inherit its handle and lock)
            done = [(image_ids[i], *next(results)) for i in range(start, stop)]
            write_proposal_store(f, done, store_attrs)
    finally:
        results.close()  # shuts the worker pool down
    merge_proposal_stores(chunk_files, out_path, store_attrs)
    for f in chunk_files:
        f.unlink()
    return Path(out_path)


def _chunk_is_valid(path: Path, image_ids: Sequence[str], attrs: Mapping[str, Any]) -> bool:
    try:
        store = ProposalStore(path)
    except (OSError, ProposalFileError):
        return False
    return store.image_ids == list(image_ids) and store.params == _jsonable(attrs)


# ---------------------------------------------------------------------------------------------------------------
# HDF5 store
# ---------------------------------------------------------------------------------------------------------------
def _jsonable(attrs: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(attrs), default=str))


class ProposalWriter:
    """Streams per-image boxes into a store; the file appears at ``path`` only when :meth:`close` succeeds.

        with ProposalWriter(path, {"mode": "fast"}) as w:
            w.add("000005", boxes, (500, 375))
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.attrs = _jsonable(attrs or {})
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._h5 = h5py.File(self._tmp, "w")
        except BaseException as e:
            self._atomic.__exit__(type(e), e, None)
            raise
        self._boxes = self._h5.create_dataset("boxes", shape=(0, 4), maxshape=(None, 4), dtype="float32",
                                              chunks=(8192, 4), compression="gzip", compression_opts=1,
                                              shuffle=True)
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._sizes: list[tuple[int, int]] = []
        self._offsets: list[int] = [0]
        self._closed = False

    def add(self, image_id: str, boxes: np.ndarray, size: tuple[int, int]) -> None:
        image_id = str(image_id)
        if image_id in self._seen:
            raise ValueError(f"{self.path}: image {image_id} added twice")
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n0 = self._offsets[-1]
        if len(b):
            self._boxes.resize(n0 + len(b), axis=0)
            self._boxes[n0:] = b
        self._ids.append(image_id)
        self._seen.add(image_id)
        self._sizes.append((int(size[0]), int(size[1])))
        self._offsets.append(n0 + len(b))

    def close(self) -> Path:
        if self._closed:
            return self.path
        self._closed = True
        f = self._h5
        f.create_dataset("offsets", data=np.asarray(self._offsets, np.int64))
        f.create_dataset("image_ids", data=np.asarray(self._ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("sizes", data=np.asarray(self._sizes, np.int32).reshape(-1, 2))
        f.attrs["format"] = STORE_FORMAT
        f.attrs["version"] = STORE_VERSION
        f.attrs["box_format"] = BOX_FORMAT
        f.attrs["params_json"] = json.dumps(self.attrs, sort_keys=True)
        for k, v in self.attrs.items():
            if isinstance(v, (str, int, float, bool)) and k not in ("format", "version", "box_format"):
                f.attrs[k] = v
        f.close()
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._h5.close()
        finally:
            try:
                self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def __enter__(self) -> "ProposalWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_proposal_store(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray, tuple[int, int]]],
                         attrs: Mapping[str, Any] | None = None) -> Path:
    """Write ``(image_id, boxes, (width, height))`` items into a store at ``path`` (atomically)."""
    with ProposalWriter(path, attrs) as w:
        for image_id, boxes, size in items:
            w.add(image_id, boxes, size)
    return Path(path)


class ProposalStore:
    """Read access to a proposal store: ``store[image_id] -> float32 (K, 4)``.

    The index (ids, offsets, sizes, parameters) is read in ``__init__``; the HDF5 file itself is opened lazily on
    the first box access, once per process, so a store handed to DataLoader workers (pickled or forked) works.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ProposalFileError(f"{self.path}: proposal store not found")
        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in ("boxes", "offsets", "image_ids", "sizes") if k not in f]
                if missing:
                    raise ProposalFileError(f"{self.path}: not a proposal store (missing datasets {missing})")
                self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                self.image_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["image_ids"][()]]
                self._offsets = np.asarray(f["offsets"][()], np.int64)
                self._sizes = np.asarray(f["sizes"][()], np.int64).reshape(-1, 2)
                n_boxes = f["boxes"].shape[0]
        except OSError as e:
            raise ProposalFileError(f"{self.path}: not a readable HDF5 file ({e})") from None
        n = len(self.image_ids)
        if len(self._offsets) != n + 1 or len(self._sizes) != n or self._offsets[-1] != n_boxes \
                or (np.diff(self._offsets) < 0).any():
            raise ProposalFileError(f"{self.path}: inconsistent store ({n} images, {len(self._offsets)} offsets, "
                                    f"{len(self._sizes)} sizes, {n_boxes} boxes)")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if len(self._index) != n:
            raise ProposalFileError(f"{self.path}: duplicate image ids")
        self.params: dict = json.loads(self.attrs.get("params_json", "{}"))
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:  # pickled (DataLoader workers, DDP jobs) without the open file handle
        return {**self.__dict__, "_h5": None, "_pid": None}

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def _position(self, image_id: str) -> int:
        try:
            return self._index[str(image_id)]
        except KeyError:
            raise KeyError(f"{self.path}: no proposals for image {image_id!r}") from None

    def __getitem__(self, image_id: str) -> np.ndarray:
        i = self._position(image_id)
        a, b = self._offsets[i], self._offsets[i + 1]
        if a == b:
            return np.zeros((0, 4), np.float32)
        return np.asarray(self._file()["boxes"][a:b], dtype=np.float32)

    def size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of the image."""
        w, h = self._sizes[self._position(image_id)]
        return int(w), int(h)

    def num_boxes(self, image_id: str | None = None) -> int:
        if image_id is None:
            return int(self._offsets[-1])
        i = self._position(image_id)
        return int(self._offsets[i + 1] - self._offsets[i])

    def counts(self) -> np.ndarray:
        """Boxes per image, in store order."""
        return np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.image_ids:
            yield image_id, self[image_id]

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __enter__(self) -> "ProposalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"ProposalStore({str(self.path)!r}, images={len(self)}, boxes={self.num_boxes()})"


def merge_proposal_stores(inputs: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                          attrs: Mapping[str, Any] | None = None) -> Path:
    """Concatenate stores (in the given order) into one; an image in two inputs is an error."""
    with ProposalWriter(out_path, attrs) as w:
        for p in inputs:
            with ProposalStore(p) as store:
                for image_id in store.image_ids:
                    if image_id in w._seen:
                        raise ProposalFileError(f"{p}: image {image_id} is also in an earlier store")
                    w.add(image_id, store[image_id], store.size(image_id))
    return Path(out_path)


# ---------------------------------------------------------------------------------------------------------------
# importers of precomputed proposals
# ---------------------------------------------------------------------------------------------------------------
def _mat_string(x: Any) -> str:
    """A MATLAB char array / cell element as loaded by scipy.io.loadmat -> str."""
    a = np.asarray(x)
    while a.dtype == object and a.size == 1:
        a = np.asarray(a.reshape(-1)[0])
    if a.dtype.kind in "US":
        return "".join(str(s) for s in a.reshape(-1)).strip()
    if a.size == 1 and a.dtype.kind in "iuf":
        return str(int(a.reshape(-1)[0]))
    raise ProposalFileError(f"cannot read an image name from a .mat element of type {a.dtype}")


def _mat_boxes(x: Any, where: str) -> np.ndarray:
    """Fast R-CNN ``(y1, x1, y2, x2)`` 1-based inclusive boxes -> our ``(x1, y1, x2, y2)`` 0-based continuous.

    A 1-based inclusive pixel range ``a..b`` is the continuous interval ``[a - 1, b]`` (same rule as VOC XML
    boxes in :mod:`pipeline.voc`).
    """
    a = np.asarray(x)
    if a.dtype == object:
        raise ProposalFileError(f"{where}: expected a numeric Kx4 box array, got a nested cell")
    a = a.astype(np.float64)
    if a.size == 0:
        return np.zeros((0, 4), np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ProposalFileError(f"{where}: expected a Kx4 box array (y1, x1, y2, x2), got shape {a.shape}")
    return np.column_stack([a[:, 1] - 1.0, a[:, 0] - 1.0, a[:, 3], a[:, 2]])


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ProposalFileError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7") \
            from None
    except (ValueError, OSError, TypeError) as e:
        raise ProposalFileError(f"{path}: not a readable .mat file ({e})") from None


def load_mat_proposals(path: str | os.PathLike, image_ids: Sequence[str] | None = None,
                       key: str = "boxes") -> dict[str, np.ndarray]:
    """Proposals in the Fast R-CNN release layout, converted to our box convention (not yet clipped/filtered).

    ``path`` is either
    - a ``.mat`` file with a cell array ``boxes`` (one Kx4 ``(y1, x1, y2, x2)`` 1-based array per image) and a
      cell array ``images`` of image names (the release's ``voc_2007_<split>.mat``); without ``images`` the
      cells are taken in the order of ``image_ids`` (their counts must agree), or
    - a directory of per-image files ``<image_id>.mat`` each holding one Kx4 array ``boxes``; only the files of
      ``image_ids`` are read when given.
    """
    path = Path(path)
    if path.is_dir():
        ids = list(image_ids) if image_ids is not None else sorted(p.stem for p in path.glob("*.mat"))
        out = {}
        for image_id in ids:
            f = path / f"{image_id}.mat"
            if not f.is_file():
                raise ProposalFileError(f"{f}: no proposal file for image {image_id}")
            m = _loadmat(f)
            if key not in m:
                raise ProposalFileError(f"{f}: no variable {key!r} (has {sorted(k for k in m if not k.startswith('__'))})")
            out[image_id] = _mat_boxes(m[key], str(f))
        return out
    if not path.is_file():
        raise ProposalFileError(f"{path}: proposal file not found")
    m = _loadmat(path)
    if key not in m:
        raise ProposalFileError(f"{path}: no variable {key!r} (has {sorted(k for k in m if not k.startswith('__'))})")
    cells = np.asarray(m[key])
    if cells.dtype != object:  # a single numeric array: one image
        one = np.empty(1, dtype=object)
        one[0] = cells
        cells = one
    cells = cells.reshape(-1)
    if "images" in m:
        names = [_mat_string(x) for x in np.asarray(m["images"]).reshape(-1)]
        if len(names) != len(cells):
            raise ProposalFileError(f"{path}: {len(names)} image names but {len(cells)} box arrays")
    elif image_ids is not None:
        names = [str(i) for i in image_ids]
        if len(names) != len(cells):
            raise ProposalFileError(f"{path}: no 'images' variable and {len(cells)} box arrays for "
                                    f"{len(names)} images: cannot tell which boxes belong to which image")
    else:
        raise ProposalFileError(f"{path}: no 'images' variable; pass the split's image ids in file order")
    return {name: _mat_boxes(c, f"{path} (image {name})") for name, c in zip(names, cells)}


def load_npz_proposals(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Proposals in our convention from ``.npz`` or ``.h5``.

    ``.npz``: either one Kx4 array per image id (``np.savez(path, **{image_id: boxes})``) or the ragged layout
    ``boxes`` (N, 4), ``offsets`` (n + 1,), ``image_ids`` (n,). ``.h5``/``.hdf5``: a store of this module, or an
    HDF5 file with the same ragged datasets.
    """
    path = Path(path)
    if not path.is_file():
        raise ProposalFileError(f"{path}: proposal file not found")
    if path.suffix in (".h5", ".hdf5"):
        try:
            with h5py.File(path, "r") as f:
                data = {k: f[k][()] for k in ("boxes", "offsets", "image_ids") if k in f}
        except OSError as e:
            raise ProposalFileError(f"{path}: not a readable HDF5 file ({e})") from None
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ProposalFileError(f"{path}: not a readable .npz file ({e})") from None
    if {"boxes", "offsets", "image_ids"} <= set(data):
        boxes = np.asarray(data["boxes"], np.float64).reshape(-1, 4)
        offsets = np.asarray(data["offsets"], np.int64)
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in data["image_ids"]]
        if len(offsets) != len(ids) + 1 or offsets[-1] != len(boxes):
            raise ProposalFileError(f"{path}: offsets do not match boxes/image_ids")
        return {i: boxes[offsets[k]:offsets[k + 1]] for k, i in enumerate(ids)}
    if path.suffix in (".h5", ".hdf5"):
        raise ProposalFileError(f"{path}: expected datasets boxes, offsets, image_ids")
    out = {}
    for k, v in data.items():
        v = np.asarray(v, np.float64)
        if v.size and (v.ndim != 2 or v.shape[1] != 4):
            raise ProposalFileError(f"{path}: array {k!r} has shape {v.shape}, expected (K, 4)")
        out[k] = v.reshape(-1, 4)
    return out


def import_proposals(source: str, path: str | os.PathLike, images: Sequence[tuple[str, int, int]],
                     min_size: float = DEFAULT_MIN_SIZE, max_boxes: int | None = None, seed: int = 0,
                     ) -> Iterator[tuple[str, np.ndarray, tuple[int, int]]]:
    """``(image_id, boxes, (width, height))`` for each of ``images`` (``(image_id, width, height)``) from a
    precomputed file, in the same canonical form as :func:`selective_search` (clipped, filtered, sorted)."""
    if source == "mat":
        table = load_mat_proposals(path, [i for i, _, _ in images])
    elif source in ("npz", "h5"):
        table = load_npz_proposals(path)
    else:
        raise ValueError(f"unknown proposal source {source!r} (expected 'mat', 'npz' or 'h5')")
    missing = [i for i, _, _ in images if i not in table]
    if missing:
        raise ProposalFileError(f"{path}: no proposals for {len(missing)} of {len(images)} images "
                                f"(e.g. {missing[:5]})")
    for image_id, w, h in images:
        yield image_id, postprocess_boxes(table[image_id], w, h, min_size, max_boxes, seed), (int(w), int(h))


def import_proposal_store(source: str, path: str | os.PathLike, images: Sequence[tuple[str, int, int]],
                          out: str | os.PathLike, params: SelectiveSearchParams,
                          attrs: Mapping[str, Any] | None = None) -> Path:
    """:func:`import_proposals` of ``images`` (``(image_id, width, height)``) written as a store at ``out``, with
    ``params``' box filter (``min_size``, ``max_boxes``, ``seed``)."""
    return write_proposal_store(out, import_proposals(source, path, images, params.min_size, params.max_boxes,
                                                      params.seed), attrs)


def store_report(path: str | os.PathLike, image_ids: Sequence[str]) -> dict:
    """Images and boxes of the store at ``path``, checked to hold exactly ``image_ids`` in that order (raises
    ``RuntimeError`` otherwise)."""
    store = ProposalStore(path)
    if store.image_ids != list(image_ids):
        raise RuntimeError(f"{path}: images differ from the {len(image_ids)} expected ones")
    counts = store.counts()
    return {"images": len(store), "boxes": int(counts.sum()),
            "boxes_per_image": {"mean": float(counts.mean()) if len(counts) else 0.0,
                                "min": int(counts.min()) if len(counts) else 0,
                                "max": int(counts.max()) if len(counts) else 0},
            "images_without_boxes": int((counts == 0).sum())}
