"""The main job: ``PseudoLabels`` runs stages 1-5 and writes a summary of where everything is.

    make pseudo-labels                       # embedded synthetic dataset
    make pseudo-labels VOC_ROOT=... CLICKS=...
"""
from __future__ import annotations

from pathlib import Path

from luigi.util import inherits

from pipeline.io import read_json, write_json, write_text

from .base import StageTask
from .pseudo import FusePseudoBoxes


@inherits(FusePseudoBoxes)
class PseudoLabels(StageTask):
    """Stages 1-5 (dataset -> proposals -> selection -> classifier -> CAMs -> pseudo boxes); writes
    ``summary.md`` / ``summary.json`` pointing at the labels, the exports and the HTML report."""

    def requires(self):
        return self.clone(FusePseudoBoxes)

    def run_stage(self, work: Path) -> None:
        boxes_dir = self.input_dir().resolve()
        files = {
            "pseudo_labels_csv": boxes_dir / "pseudo_labels.csv",
            "voc_annotations": boxes_dir / "Annotations",
            "coco_json": boxes_dir / "coco.json",
            "metrics": boxes_dir / "metrics.json",
            "per_class": boxes_dir / "per_class.csv",
            "report": boxes_dir / "report" / "index.html",
        }
        files = {k: str(v) for k, v in files.items() if v.exists()}
        metrics = read_json(boxes_dir / "metrics.json") if (boxes_dir / "metrics.json").is_file() else {}
        write_json(work / "summary.json", {"stage_dirs": self._chain(), "files": files, "metrics": metrics})
        lines = ["# clickscale pseudo labels", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in files.items()]
        inner = boxes_dir / "summary.md"
        if inner.is_file():
            lines += ["", inner.read_text().strip()]
        write_text(work / "summary.md", "\n".join(lines) + "\n")

    def _chain(self) -> dict:
        """Output directory of every stage this run used, upstream first (a second output of one stage, as with
        ``--cam-ensemble``, under its ``<Stage>/<hash>``)."""
        chain, task = {}, self.requires()
        todo = [task]
        while todo:
            t = todo.pop(0)
            if isinstance(t, StageTask):
                path = str(Path(t.output().path).resolve())
                key = t.task_family if chain.get(t.task_family, path) == path else t.stage_ref  # e.g. an ensemble
                chain[key] = path
                todo.extend(t.upstream())
        return dict(reversed(list(chain.items())))
