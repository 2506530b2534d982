"""PrepareDataset: the first stage. Reads a folder of images and a click file, or a VOC<year> root, or generates the
embedded synthetic dataset (default); validates them and writes the manifest tables every later stage reads."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import luigi

from pipeline.dataset import build_image_manifest, build_manifest, hold_out
from pipeline.io import write_csv
from pipeline.pointformats import POINT_FORMATS

from .base import StageTask
from .defaults import TUNED

log = logging.getLogger("clickscale")


class PrepareDataset(StageTask):
    """Dataset manifest: ``images.csv``, ``objects.csv``, ``clicks.csv``, ``manifest.json``, ``summary.csv``.

    Three sources: ``--images DIR --clicks FILE`` (a folder of images and a click file; ``--gt`` optional), a VOC
    root (``--voc-root``; its ``Annotations/`` are the ground truth, the test split optional), or, with neither, the
    embedded synthetic dataset, generated under ``data/`` once.
    """

    voc_root = luigi.Parameter(default="", description="VOC<year> root; empty: --images, else the embedded "
                                                       "synthetic dataset")
    images = luigi.Parameter(default="", description="folder of images (searched recursively; image id = path "
                                                     "relative to it without extension); needs --clicks")
    gt = luigi.Parameter(default="", description="with --images: ground truth for the metrics only (a VOC "
                                                 "Annotations/ folder or a COCO JSON with boxes)")
    clicks = luigi.Parameter(default="", description="click file (CSV, COCO, CVAT XML, Label Studio JSON); empty: "
                                                     "clicks_trainval.csv beside the VOC root if present, else "
                                                     "simulated from the ground truth")
    clicks_format = luigi.ChoiceParameter(choices=["auto", *POINT_FORMATS], default="auto",
                                          description="format of --clicks (auto: by extension and content)")
    classes = luigi.Parameter(default="", description="comma-separated class list and order; empty: VOC's classes "
                                                      "(VOC root) or the sorted classes of the clicks (--images)")
    annotator = luigi.IntParameter(default=1, description="which annotator's clicks to use (one click per object)")
    clicks_per_object = luigi.ChoiceParameter(choices=["1", "2"], default="1",
                                              description="2: pair two annotators' clicks of each object (paper "
                                                          "001): their mean is the click, their distance an "
                                                          "estimate of the object's size (docs/method.md)")
    annotators = luigi.Parameter(default="1,2", description="with --clicks-per-object 2: the two annotators")
    on_bad_click = luigi.ChoiceParameter(choices=["error", "skip"], default="error")
    on_bad_image = luigi.ChoiceParameter(choices=["error", "skip"], default="error")
    sim_click_sigma = luigi.FloatParameter(default=0.08, description="error of simulated clicks (no click file), "
                                                                     "a fraction of the box side")
    data_seed = luigi.IntParameter(default=TUNED.data_seed,
                                   description="seed of the dataset: synthetic images, simulated clicks (and the "
                                               "proposal subsets of --ss-max-boxes); training has --seed")
    synth_trainval = luigi.IntParameter(default=300, description="synthetic dataset: trainval images")
    synth_test = luigi.IntParameter(default=200, description="synthetic dataset: test images")
    synth_image_px = luigi.IntParameter(default=320, description="synthetic dataset: image side (px, square)")
    data_root = luigi.Parameter(default="data", significant=False, description="where the synthetic dataset is "
                                                                               "generated")

    eval_holdout = luigi.IntParameter(default=0, description="move this many trainval images (a --data-seed choice) "
                                                             "to split 'holdout': ground truth only, their clicks "
                                                             "dropped; EvaluateVOC07 then scores the detector on "
                                                             "them. 0: none")
    unhashed_values = {"eval_holdout": "0"}  # the dataset before --eval-holdout existed

    #: parameters that change the clicks only, never the images (the synthetic images depend on data_seed and the
    #: synth_* sizes, not on sim_click_sigma); ``gt`` is read for the metrics only
    CLICK_PARAMS = ("clicks", "clicks_format", "annotator", "clicks_per_object", "annotators", "on_bad_click",
                    "sim_click_sigma", "gt", "classes")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.images and self.voc_root:
            raise ValueError("PrepareDataset: give --images or --voc-root, not both")
        if self.images and not self.clicks:
            raise ValueError("PrepareDataset --images needs --clicks (a click file)")
        if self.gt and not self.images:
            raise ValueError("PrepareDataset --gt goes with --images (a VOC root's ground truth is its Annotations/)")
        self.annotator_ids()  # a bad --annotators fails here, before any stage runs
        if self.eval_holdout < 0:
            raise ValueError(f"--eval-holdout must be >= 0, got {self.eval_holdout}")

    def requires(self):
        return []

    @property
    def images_ref(self) -> str:
        """Identity of the image set alone: every significant parameter but :attr:`CLICK_PARAMS`. Stages that read
        only the images (selective search) hash this instead of ``stage_ref``, so another click file or annotator
        reuses their outputs. With ``--images`` the trainval split is the images that have clicks, so there the
        click parameters (not ``gt``) stay in."""
        keep = ("clicks", "clicks_format", "annotator", "clicks_per_object", "annotators", "on_bad_click",
                "classes") if self.images else ()
        params = {k: v for k, v in self.significant_params().items() if k not in self.CLICK_PARAMS or k in keep}
        blob = json.dumps({"stage": self.task_family, "version": self.stage_version, "images": params},
                          sort_keys=True)
        return f"{self.task_family}/images-{hashlib.md5(blob.encode()).hexdigest()[:12]}"

    def class_list(self) -> list[str] | None:
        names = [c.strip() for c in self.classes.split(",") if c.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"--classes {self.classes!r}: each class once")
        return names or None

    def resolve_dataset(self) -> tuple[Path, Path | None]:
        """(voc_root, clicks file or None), generating the synthetic dataset when no root is given."""
        if self.voc_root:
            root = Path(self.voc_root)
            if not (root / "Annotations").is_dir():
                raise FileNotFoundError(f"{root}: not a VOC<year> root (no Annotations/ folder); for a folder of "
                                        "images without annotations use --images DIR --clicks FILE")
            clicks = Path(self.clicks) if self.clicks else None
            if clicks is None and (root.parent / "clicks_trainval.csv").is_file():
                clicks = root.parent / "clicks_trainval.csv"
            return root, clicks
        from pipeline.synthetic import ensure_dataset

        out = Path(self.data_root) / (f"synthetic-s{self.data_seed}-{self.synth_trainval}-{self.synth_test}"
                                      f"-{self.synth_image_px}-c{self.sim_click_sigma:g}")
        root = ensure_dataset(out, n_trainval=self.synth_trainval, n_test=self.synth_test,
                              image_size=self.synth_image_px, seed=self.data_seed, click_sigma=self.sim_click_sigma)
        return root, Path(self.clicks) if self.clicks else out / "clicks_trainval.csv"

    def annotator_ids(self) -> int | list[int]:
        """``--annotator``, or the two ``--annotators`` with ``--clicks-per-object 2`` (checked at creation)."""
        if self.clicks_per_object == "1":
            return self.annotator
        try:
            ids = [int(a) for a in self.annotators.split(",") if a.strip()]
        except ValueError:
            ids = []
        if len(ids) != 2 or ids[0] == ids[1]:
            raise ValueError(f"--annotators {self.annotators!r}: two distinct annotator ids, e.g. 1,2")
        return ids

    def run_stage(self, work: Path) -> None:
        common = dict(classes=self.class_list(), annotator=self.annotator_ids(), on_bad_click=self.on_bad_click,
                      on_bad_image=self.on_bad_image, clicks_format=self.clicks_format)
        if self.images:
            manifest = build_image_manifest(self.images, self.clicks, gt=self.gt or None, **common)
        else:
            root, clicks = self.resolve_dataset()
            if not self.voc_root and not common["classes"]:
                from pipeline.synthetic import SYNTH_CLASSES

                common["classes"] = SYNTH_CLASSES
            manifest = build_manifest(root, clicks, click_sigma=self.sim_click_sigma, seed=self.data_seed, **common)
        manifest = hold_out(manifest, self.eval_holdout, self.data_seed)
        manifest.save(work)
        write_csv(summary_table(manifest), work / "summary.csv")


def summary_table(manifest):
    """Per split and class: images holding the class (by ground truth, else by clicks), objects, difficult
    objects (0 without ground truth), clicks."""
    import pandas as pd

    objs = manifest.objects.merge(manifest.images[["image_id", "split"]], on="image_id")
    rows = []
    for split in sorted(set(manifest.images.split)):
        sub = objs[objs.split == split]
        for cls in manifest.classes:
            o = sub[sub["class"] == cls]
            c = manifest.clicks[manifest.clicks["class"] == cls] if split == "trainval" else manifest.clicks[:0]
            rows.append({"split": split, "class": cls,
                         "images": o.image_id.nunique() if len(objs) else c.image_id.nunique(), "objects": len(o),
                         "difficult": int(o.difficult.astype(bool).sum()), "clicks": len(c)})
    return pd.DataFrame(rows)
