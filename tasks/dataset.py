"""PrepareDataset: the first stage. Generates the embedded synthetic dataset (default) or validates a real
VOC<year> root and its click file, and writes the manifest tables every later stage reads."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import luigi

from pipeline.dataset import build_manifest
from pipeline.io import write_csv

from .base import StageTask

log = logging.getLogger("clickscale")


class PrepareDataset(StageTask):
    """Dataset manifest: ``images.csv``, ``objects.csv``, ``clicks.csv``, ``manifest.json``, ``summary.csv``.

    With no ``--voc-root`` the embedded synthetic dataset is generated under ``data/`` (once) and used.
    """

    voc_root = luigi.Parameter(default="", description="VOC<year> root; empty: the embedded synthetic dataset")
    clicks = luigi.Parameter(default="", description="click CSV; empty: the dataset's clicks_trainval.csv "
                                                     "beside the VOC root if present, else simulated from GT")
    annotator = luigi.IntParameter(default=1, description="which annotator's clicks to use")
    on_bad_click = luigi.ChoiceParameter(choices=["error", "skip"], default="error")
    on_bad_image = luigi.ChoiceParameter(choices=["error", "skip"], default="error")
    click_sigma = luigi.FloatParameter(default=0.08, description="error of simulated clicks, x box side")
    seed = luigi.IntParameter(default=0)
    synth_trainval = luigi.IntParameter(default=300)
    synth_test = luigi.IntParameter(default=200)
    synth_size = luigi.IntParameter(default=320)
    data_root = luigi.Parameter(default="data", significant=False)

    #: parameters that change the clicks only, never the images (the synthetic images depend on the seed and the
    #: synth_* sizes, not on click_sigma)
    CLICK_PARAMS = ("clicks", "annotator", "on_bad_click", "click_sigma")

    def requires(self):
        return []

    @property
    def images_ref(self) -> str:
        """Identity of the image set alone: every significant parameter but :attr:`CLICK_PARAMS`. Stages that read
        only the images (selective search) hash this instead of ``stage_ref``, so another click file or annotator
        reuses their outputs."""
        params = {k: v for k, v in self.significant_params().items() if k not in self.CLICK_PARAMS}
        blob = json.dumps({"stage": self.task_family, "version": self.stage_version, "images": params},
                          sort_keys=True)
        return f"{self.task_family}/images-{hashlib.md5(blob.encode()).hexdigest()[:12]}"

    def resolve_dataset(self) -> tuple[Path, Path | None]:
        """(voc_root, clicks file or None), generating the synthetic dataset when no root is given."""
        if self.voc_root:
            root = Path(self.voc_root)
            if not (root / "Annotations").is_dir():
                raise FileNotFoundError(f"{root}: not a VOC<year> root (no Annotations/ folder)")
            clicks = Path(self.clicks) if self.clicks else None
            if clicks is None and (root.parent / "clicks_trainval.csv").is_file():
                clicks = root.parent / "clicks_trainval.csv"
            return root, clicks
        from pipeline.synthetic import ensure_dataset

        out = Path(self.data_root) / (f"synthetic-s{self.seed}-{self.synth_trainval}-{self.synth_test}"
                                      f"-{self.synth_size}-c{self.click_sigma:g}")
        root = ensure_dataset(out, n_trainval=self.synth_trainval, n_test=self.synth_test,
                              image_size=self.synth_size, seed=self.seed, click_sigma=self.click_sigma)
        return root, Path(self.clicks) if self.clicks else out / "clicks_trainval.csv"

    def run_stage(self, work: Path) -> None:
        root, clicks = self.resolve_dataset()
        classes = None
        if not self.voc_root:
            from pipeline.synthetic import SYNTH_CLASSES

            classes = SYNTH_CLASSES
        manifest = build_manifest(root, clicks, classes=classes, annotator=self.annotator, on_bad_click=self.on_bad_click,
                                  on_bad_image=self.on_bad_image, click_sigma=self.click_sigma, seed=self.seed)
        manifest.save(work)
        write_csv(summary_table(manifest), work / "summary.csv")


def summary_table(manifest):
    """Per split and class: images, objects, difficult objects, clicks."""
    import pandas as pd

    objs = manifest.objects.merge(manifest.images[["image_id", "split"]], on="image_id")
    rows = []
    for split, sub in objs.groupby("split"):
        for cls in manifest.classes:
            o = sub[sub["class"] == cls]
            c = manifest.clicks[(manifest.clicks["class"] == cls)] if split == "trainval" else []
            rows.append({"split": split, "class": cls, "images": o.image_id.nunique(), "objects": len(o),
                         "difficult": int(o.difficult.astype(bool).sum()), "clicks": len(c)})
    return pd.DataFrame(rows)
