"""Stages 1-2: selective-search proposals (sharded) and click-guided proposal selection.

    PrepareDataset -> SelectiveSearchShard (x ss_shards per split) -> SelectiveSearch -> SelectProposals

``SelectiveSearchShard`` computes one contiguous slice of a split's images (never one task per image), so many
luigi workers, on one machine or several, can run shards at once; each shard can also use several processes
(``--ss-workers``, not part of the output hash). A killed shard reruns alone (resuming from its checkpoint chunks);
finished shards are kept. ``SelectiveSearch`` merges the shards into ``proposals_<split>.h5``, or imports
precomputed proposals (``--ss-source mat|npz|h5 --ss-import-path ...``) into the same layout.

The proposal stages read the dataset's images, never its clicks: they name it in their hash by
``PrepareDataset.images_ref`` (``StageTask.reads_part_of``), so another click file or annotator reuses the
proposals and recomputes only from SelectProposals on. Parameters carry an ``ss_`` (proposals) or ``sel_``
(selection) prefix; the proposal subsets (``--ss-max-boxes``) draw from the dataset's ``data_seed``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import luigi

from pipeline.io import atomic_path, write_json
from pipeline.proposals import (SOURCES, ProposalStore, SelectiveSearchParams, import_proposal_store,
                                merge_proposal_stores, run_proposal_shard, shard_bounds, store_report)
from pipeline.selection import select_proposals

from .base import StageTask, inherits
from .dataset import PrepareDataset
from .defaults import TUNED

log = logging.getLogger("clickscale")


class _SelectiveSearchParams:
    """Parameters shared by the proposal tasks (a mixin: luigi finds parameters on base classes)."""

    reads_part_of = {"PrepareDataset": "images_ref"}  # the images, not the clicks (module docstring)

    ss_mode = luigi.ChoiceParameter(choices=["fast", "quality"], default=TUNED.ss_mode,
                                    description="OpenCV selective search strategy")
    ss_image_max_px = luigi.IntParameter(default=TUNED.ss_image_max_px,
                                         description="longest image side given to selective search (px)")
    ss_box_min_px = luigi.FloatParameter(default=TUNED.ss_box_min_px,
                                         description="drop proposals with a side shorter than this (px)")
    ss_max_boxes = luigi.OptionalIntParameter(default=None, description="keep at most this many proposals per "
                                                                        "image (a subset seeded by --data-seed)")
    ss_workers = luigi.IntParameter(default=0, significant=False,
                                    description="processes per shard; 0: one per core (results do not depend on "
                                                "it)")

    def ss_params(self) -> SelectiveSearchParams:
        return SelectiveSearchParams(self.ss_mode, self.ss_image_max_px, self.ss_box_min_px, self.ss_max_boxes,
                                     self.data_seed)


@inherits(PrepareDataset)
class SelectiveSearchShard(_SelectiveSearchParams, StageTask):
    """Selective search on shard ``ss_shard`` of ``ss_shards`` (contiguous slices of the split's image list).
    Output: ``proposals.h5`` (a :class:`pipeline.proposals.ProposalStore`)."""

    ss_split = luigi.Parameter(default="trainval")
    ss_shard = luigi.IntParameter(default=0)
    ss_shards = luigi.IntParameter(default=1)
    ss_chunk_images = luigi.IntParameter(default=50, significant=False,
                                         description="images per checkpoint inside the shard")

    def requires(self):
        return self.clone(PrepareDataset)

    def shard_images(self):
        images = self.manifest().split(self.ss_split)
        if images.empty:
            raise ValueError(f"the dataset has no images in split {self.ss_split!r}")
        start, stop = shard_bounds(len(images), self.ss_shard, self.ss_shards)
        return images.iloc[start:stop]

    def run_stage(self, work: Path) -> None:
        images = self.shard_images()
        t0 = time.time()
        run_proposal_shard(list(images.image_id), list(images.path), work / "proposals.h5", self.ss_params(),
                           workers=self.ss_workers, checkpoint_dir=work / "chunks", chunk_size=self.ss_chunk_images,
                           attrs={"split": self.ss_split, "shard": self.ss_shard, "n_shards": self.ss_shards})
        (work / "chunks").rmdir()
        store = ProposalStore(work / "proposals.h5")
        counts = store.counts()
        log.info("SelectiveSearchShard %s %d/%d: %d images, %.0f boxes/image, %.2f s/image",
                 self.ss_split, self.ss_shard, self.ss_shards, len(store), counts.mean() if len(counts) else 0,
                 (time.time() - t0) / max(1, len(store)))


@inherits(PrepareDataset)
class SelectiveSearch(_SelectiveSearchParams, StageTask):
    """Proposals of every image of ``ss_splits``: ``proposals_<split>.h5`` and ``report.json``.

    ``ss_source=selective_search`` merges ``ss_shards`` :class:`SelectiveSearchShard` outputs per split;
    ``mat`` / ``npz`` / ``h5`` import ``ss_import_path`` instead (``{split}`` in it is replaced by the split name;
    ``mat`` takes the Fast R-CNN release's ``<split>.mat`` or a directory of per-image ``.mat`` files).
    """

    ss_splits = luigi.ListParameter(default=["trainval"], description="splits to compute proposals for: the "
                                                                      "pseudo boxes need trainval; EvaluateVOC07 "
                                                                      "adds its --eval-split itself")
    ss_shards = luigi.IntParameter(default=4, description="SelectiveSearchShard tasks per split")
    ss_source = luigi.ChoiceParameter(choices=list(SOURCES), default="selective_search",
                                      description="compute the proposals, or import them from --ss-import-path")
    ss_import_path = luigi.Parameter(default="", description="file or directory to import (--ss-source mat, npz "
                                                             "or h5); may contain {split}")

    def requires(self):
        reqs = {"dataset": self.clone(PrepareDataset)}
        if self.ss_source == "selective_search":
            reqs["shards"] = [self.clone(SelectiveSearchShard, ss_split=split, ss_shard=i, ss_shards=self.ss_shards)
                              for split in self.ss_splits for i in range(self.ss_shards)]
        elif not self.ss_import_path:
            raise ValueError(f"SelectiveSearch --ss-source {self.ss_source} needs --ss-import-path")
        return reqs

    def store_path(self, split: str) -> Path:
        return self.stage_dir / f"proposals_{split}.h5"

    def shard_stores(self, split: str) -> list[Path]:
        """The ``proposals.h5`` of ``split``'s shards, in shard order."""
        shards = sorted((t for t in self.requires()["shards"] if t.ss_split == split), key=lambda t: t.ss_shard)
        return [Path(t.output().path) / "proposals.h5" for t in shards]

    def run_stage(self, work: Path) -> None:
        manifest, params = self.manifest(), self.ss_params()
        report = {"source": self.ss_source, "params": params.as_dict(), "splits": {}}
        for split in self.ss_splits:
            out, images = work / f"proposals_{split}.h5", manifest.split(split)
            attrs = {"source": self.ss_source, "split": split, **params.as_dict()}
            if self.ss_source == "selective_search":
                merge_proposal_stores(self.shard_stores(split), out, attrs)
            else:
                path = self.ss_import_path.replace("{split}", split)
                items = list(zip(images.image_id, images.width.astype(int), images.height.astype(int)))
                import_proposal_store(self.ss_source, path, items, out, params, {**attrs, "proposals_path": path})
            report["splits"][split] = store_report(out, list(images.image_id))
            log.info("SelectiveSearch %s: %d images, %.0f boxes/image", split, report["splits"][split]["images"],
                     report["splits"][split]["boxes_per_image"]["mean"])
        write_json(work / "report.json", report)


@inherits(SelectiveSearch)
class SelectProposals(StageTask):
    """Per click, up to ``sel_per_click`` proposals containing it, nearest center first, overlaps above
    ``sel_nms_iou`` removed; ``sel_exclusive``: proposals that also contain another click of the same class are
    dropped first (:mod:`pipeline.selection`). Output: ``selected.parquet``
    (:data:`pipeline.selection.SELECTED_COLUMNS`) and ``report.json``."""

    sel_per_click = luigi.IntParameter(default=TUNED.sel_per_click, description="proposals kept per click")
    sel_nms_iou = luigi.FloatParameter(default=TUNED.sel_nms_iou,
                                       description="drop a proposal overlapping a kept one above this IoU")
    sel_exclusive = luigi.BoolParameter(default=TUNED.sel_exclusive, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                        description="drop proposals that also contain another click of the same "
                                                    "class (kept when nothing else contains the click)")

    def requires(self):
        # the dataset directly as well: the proposals may come from another click file's run (their hash leaves
        # the clicks out), and then luigi would not build this click file's dataset stage through them
        return {"proposals": self.clone(SelectiveSearch), "dataset": self.clone(PrepareDataset)}

    def run_stage(self, work: Path) -> None:
        if "trainval" not in self.ss_splits:
            raise ValueError("SelectProposals needs trainval proposals: add trainval to --ss-splits")
        clicks = self.manifest().clicks
        with ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") as store:
            table, report = select_proposals(clicks, store, n=self.sel_per_click, iou=self.sel_nms_iou,
                                             exclusive=self.sel_exclusive)
        with atomic_path(work / "selected.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        write_json(work / "report.json", report)
        log.info("SelectProposals: %d clicks -> %d crops (%d fallbacks)", report["clicks"], report["crops"],
                 report["fallbacks"])
