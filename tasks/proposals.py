"""Stages 1-2: selective-search proposals (sharded) and click-guided proposal selection.

    PrepareDataset -> SelectiveSearchShard (x n_shards per split) -> SelectiveSearch -> SelectProposals

``SelectiveSearchShard`` computes one contiguous slice of a split's images (never one task per image), so many
luigi workers, on one machine or several, can run shards at once; each shard can also use several processes
(``--ss-workers``, not part of the output hash). A killed shard reruns alone (resuming from its checkpoint chunks);
finished shards are kept. ``SelectiveSearch`` merges the shards into ``proposals_<split>.h5``, or imports
precomputed proposals (``--source mat|npz|h5 --proposals-path ...``) into the same layout.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import luigi
from luigi.util import inherits

from pipeline.io import atomic_path, write_json
from pipeline.proposals import (SOURCES, ProposalStore, ProposalWriter, SelectiveSearchParams, import_proposals,
                                merge_proposal_stores, run_proposal_shard, shard_bounds)
from pipeline.selection import select_proposals

from .base import StageTask
from .dataset import PrepareDataset

log = logging.getLogger("clickscale")


class _SelectiveSearchParams:
    """Parameters shared by the proposal tasks (a mixin: luigi finds parameters on base classes)."""

    mode = luigi.ChoiceParameter(choices=["fast", "quality"], default="fast",
                                 description="OpenCV selective search strategy")
    max_side = luigi.IntParameter(default=500, description="longest image side for selective search (px)")
    min_size = luigi.FloatParameter(default=20.0, description="drop boxes with a side shorter than this (px)")
    max_boxes = luigi.OptionalIntParameter(default=None,
                                           description="keep at most this many boxes per image (seeded subset)")
    ss_workers = luigi.IntParameter(default=0, significant=False,
                                    description="processes per shard; 0: one per core (results do not depend on "
                                                "it)")

    def ss_params(self) -> SelectiveSearchParams:
        return SelectiveSearchParams(self.mode, self.max_side, self.min_size, self.max_boxes, self.seed)


class _ImagesOnly:
    """Proposal stages read the dataset's images, never its clicks: their hash leaves out the click parameters and
    names the dataset by ``PrepareDataset.images_ref``, so changing the click file or the annotator (a new
    PrepareDataset) reuses the proposals and recomputes only from SelectProposals on."""

    def significant_params(self) -> dict:
        return {k: v for k, v in super().significant_params().items() if k not in PrepareDataset.CLICK_PARAMS}

    def hash_refs(self) -> list[str]:
        return [t.images_ref if isinstance(t, PrepareDataset) else t.stage_ref for t in self.upstream()]


@inherits(PrepareDataset)
class SelectiveSearchShard(_ImagesOnly, _SelectiveSearchParams, StageTask):
    """Selective search on shard ``shard`` of ``n_shards`` (contiguous slices of the split's image list).
    Output: ``proposals.h5`` (a :class:`pipeline.proposals.ProposalStore`)."""

    split = luigi.Parameter(default="trainval")
    shard = luigi.IntParameter(default=0)
    n_shards = luigi.IntParameter(default=1)
    chunk_size = luigi.IntParameter(default=50, significant=False,
                                    description="images per checkpoint inside the shard")

    def requires(self):
        return self.clone(PrepareDataset)

    def shard_images(self):
        images = self.manifest().split(self.split)
        if images.empty:
            raise ValueError(f"the dataset has no images in split {self.split!r}")
        start, stop = shard_bounds(len(images), self.shard, self.n_shards)
        return images.iloc[start:stop]

    def run_stage(self, work: Path) -> None:
        images = self.shard_images()
        t0 = time.time()
        run_proposal_shard(list(images.image_id), list(images.path), work / "proposals.h5", self.ss_params(),
                           workers=self.ss_workers, checkpoint_dir=work / "chunks", chunk_size=self.chunk_size,
                           attrs={"split": self.split, "shard": self.shard, "n_shards": self.n_shards})
        (work / "chunks").rmdir()
        store = ProposalStore(work / "proposals.h5")
        counts = store.counts()
        log.info("SelectiveSearchShard %s %d/%d: %d images, %.0f boxes/image, %.2f s/image",
                 self.split, self.shard, self.n_shards, len(store), counts.mean() if len(counts) else 0,
                 (time.time() - t0) / max(1, len(store)))


@inherits(PrepareDataset)
class SelectiveSearch(_ImagesOnly, _SelectiveSearchParams, StageTask):
    """Proposals of every image of ``splits``: ``proposals_<split>.h5`` and ``report.json``.

    ``source=selective_search`` merges ``n_shards`` :class:`SelectiveSearchShard` outputs per split;
    ``mat`` / ``npz`` / ``h5`` import ``proposals_path`` instead (``{split}`` in it is replaced by the split name;
    ``mat`` takes the Fast R-CNN release's ``<split>.mat`` or a directory of per-image ``.mat`` files).
    """

    splits = luigi.ListParameter(default=["trainval"], description="splits to compute proposals for: the pseudo "
                                                                   "boxes need trainval; EvaluateVOC07 adds its "
                                                                   "--test-split itself")
    n_shards = luigi.IntParameter(default=4, description="shards per split (luigi tasks)")
    source = luigi.ChoiceParameter(choices=list(SOURCES), default="selective_search")
    proposals_path = luigi.Parameter(default="", description="file or directory to import (source != "
                                                             "selective_search); may contain {split}")

    def requires(self):
        reqs = {"dataset": self.clone(PrepareDataset)}
        if self.source == "selective_search":
            reqs["shards"] = [self.clone(SelectiveSearchShard, split=split, shard=i, n_shards=self.n_shards)
                              for split in self.splits for i in range(self.n_shards)]
        elif not self.proposals_path:
            raise ValueError(f"SelectiveSearch --source {self.source} needs --proposals-path")
        return reqs

    def store_path(self, split: str) -> Path:
        return self.stage_dir / f"proposals_{split}.h5"

    def run_stage(self, work: Path) -> None:
        manifest = self.manifest()
        report = {"source": self.source, "params": self.ss_params().as_dict(), "splits": {}}
        for split in self.splits:
            out = work / f"proposals_{split}.h5"
            attrs = {"source": self.source, "split": split, **self.ss_params().as_dict()}
            if self.source == "selective_search":
                by_index = {t.shard: Path(t.output().path) / "proposals.h5"
                            for t in self.requires()["shards"] if t.split == split}
                merge_proposal_stores([by_index[i] for i in range(self.n_shards)], out, attrs)
            else:
                path = self.proposals_path.replace("{split}", split)
                attrs["proposals_path"] = path
                images = manifest.split(split)
                items = list(zip(images.image_id, images.width.astype(int), images.height.astype(int)))
                with ProposalWriter(out, attrs) as writer:
                    for image_id, boxes, size in import_proposals(self.source, path, items, self.min_size,
                                                                  self.max_boxes, self.seed):
                        writer.add(image_id, boxes, size)
            store = ProposalStore(out)
            expected = list(manifest.split(split).image_id)
            if store.image_ids != expected:
                raise RuntimeError(f"{out}: images differ from the manifest's {split} split")
            counts = store.counts()
            report["splits"][split] = {
                "images": len(store), "boxes": int(counts.sum()),
                "boxes_per_image": {"mean": float(counts.mean()) if len(counts) else 0.0,
                                    "min": int(counts.min()) if len(counts) else 0,
                                    "max": int(counts.max()) if len(counts) else 0},
                "images_without_boxes": int((counts == 0).sum()),
            }
            log.info("SelectiveSearch %s: %d images, %.0f boxes/image", split, len(store),
                     report["splits"][split]["boxes_per_image"]["mean"])
        write_json(work / "report.json", report)


@inherits(SelectiveSearch)
class SelectProposals(StageTask):
    """Per click, up to ``n`` proposals containing it, nearest center first, overlaps above ``iou`` removed;
    ``exclusive``: proposals that also contain another click of the same class are dropped first
    (:mod:`pipeline.selection`). Output: ``selected.parquet`` (:data:`pipeline.selection.SELECTED_COLUMNS`) and
    ``report.json``."""

    n = luigi.IntParameter(default=8, description="proposals kept per click")
    iou = luigi.FloatParameter(default=0.7, description="drop a proposal overlapping a kept one above this IoU")
    exclusive = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                    description="drop proposals that also contain another click of the same class "
                                                "(kept when nothing else contains the click)")

    def requires(self):
        # the dataset directly as well: the proposals may come from another click file's run (their hash leaves
        # the clicks out), and then luigi would not build this click file's dataset stage through them
        return {"proposals": self.clone(SelectiveSearch), "dataset": self.clone(PrepareDataset)}

    def run_stage(self, work: Path) -> None:
        if "trainval" not in self.splits:
            raise ValueError("SelectProposals needs trainval proposals: add trainval to --splits")
        clicks = self.manifest().clicks
        with ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") as store:
            table, report = select_proposals(clicks, store, n=self.n, iou=self.iou,
                                             exclusive=self.exclusive)
        with atomic_path(work / "selected.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        write_json(work / "report.json", report)
        log.info("SelectProposals: %d clicks -> %d crops (%d fallbacks)", report["clicks"], report["crops"],
                 report["fallbacks"])
