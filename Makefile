# clickscale: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LUIGI := $(VENV)/bin/luigi --module tasks --local-scheduler
STAMP := $(VENV)/.installed
# The machine's pip may be pointed (PIP_FIND_LINKS) at a CPU-only torch wheel that cannot load torchvision's
# operators: install with it unset so torch and torchvision come from the registry as a matching pair.
PIP := env -u PIP_FIND_LINKS $(VENV)/bin/pip

# your own data: make pseudo-labels IMAGES=/path/images CLICKS=/path/clicks.{csv,json,xml} [GT=...]
# a VOC root:    make pseudo-labels VOC_ROOT=/path/VOCdevkit/VOC2007 CLICKS=/path/clicks.csv
IMAGES ?=
VOC_ROOT ?=
CLICKS ?=
GT ?=
ARGS ?=
DATA_ARGS := $(if $(IMAGES),--images $(IMAGES)) $(if $(VOC_ROOT),--voc-root $(VOC_ROOT)) \
             $(if $(CLICKS),--clicks $(CLICKS)) $(if $(GT),--gt $(GT))
# make detect IMAGES=<folder> [MODEL=<TrainFastRCNN output dir or model.pth>]: IMAGES is the folder to detect on
MODEL ?=
CHAIN_ARGS := $(if $(VOC_ROOT),--voc-root $(VOC_ROOT)) $(if $(CLICKS),--clicks $(CLICKS)) $(if $(GT),--gt $(GT))
TARGET ?= PseudoLabels
STAGE ?=

.PHONY: help install test test-fast pseudo-labels evaluate compare detect rerun bench bench-proposals \
        bench-selection bench-cam bench-quality bench-fusion-probe bench-kill-resume bench-detector \
        bench-detector-holdout bench-proposal-free bench-speed clean clean-outputs

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'
	@echo
	@echo "  Own data:  make pseudo-labels IMAGES=<folder> CLICKS=<csv|coco json|cvat xml|label studio json> [GT=...]"
	@echo "  VOC root:  make pseudo-labels VOC_ROOT=.../VOC2007 CLICKS=.../clicks.csv [ARGS='--Stage-param v']"
	@echo "  Detector:  make evaluate ARGS='--det-box-source gt' (GT upper bound), ARGS='--det-epochs 2' (short schedule),"
	@echo "             ARGS='--det-preset paper' (VGG16, 600 px; the default with VOC_ROOT); make compare: 6 detectors"
	@echo "             ARGS='--det-arch faster_rcnn' (RPN, no selective search); ARGS='--eval-holdout 250' (held-out trainval)"
	@echo "  Detect:    make detect IMAGES=<folder> [MODEL=...]: without MODEL the detector of make evaluate with the"
	@echo "             same VOC_ROOT/CLICKS/ARGS (trained first when missing)"

install: $(STAMP) ## build .venv and install the project with its dependencies (torch, torchvision, luigi, ...)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	$(PY) -c "import torch, torchvision, cv2; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); cv2.ximgproc"
	touch $(STAMP)

test: install ## run the whole test suite, slow tests included (the README's test command; CI runs it)
	$(PY) -m pytest -q -ra

test-fast: install ## the suite without tests marked slow (subprocess luigi/luigid/torchrun, >3 s): under 2 min on 2 cores
	$(PY) -m pytest -q -ra -m "not slow"

pseudo-labels: install ## main job: stages 1-5 -> pseudo boxes, report (IMAGES=+CLICKS=, VOC_ROOT=, or synthetic)
	$(LUIGI) PseudoLabels $(DATA_ARGS) $(ARGS)
	$(PY) -m tasks.cli show PseudoLabels $(DATA_ARGS) $(ARGS)

evaluate: install ## whole chain to EvaluateVOC07 (Fast R-CNN on pseudo labels, VOC07 mAP, CorLoc)
	$(LUIGI) EvaluateVOC07 $(DATA_ARGS) $(ARGS)
	$(PY) -m tasks.cli show EvaluateVOC07 $(DATA_ARGS) $(ARGS)

compare: install ## detectors on SA-CAM / Grad-CAM / image-label (CAM, GMP, SPAM) pseudo labels and on GT: one table
	$(LUIGI) CompareDetectors $(DATA_ARGS) $(ARGS)
	$(PY) -m tasks.cli show CompareDetectors $(DATA_ARGS) $(ARGS)

detect: install ## a trained detector on a folder: make detect IMAGES=<dir> [MODEL=<dir|model.pth>] (COCO, VOC XML, HTML)
	@test -n "$(IMAGES)" || (echo "usage: make detect IMAGES=<folder> [MODEL=<TrainFastRCNN dir or model.pth>] [ARGS=..]"; exit 2)
	$(LUIGI) Detect --detect-images $(IMAGES) $(if $(MODEL),--detect-model $(MODEL)) $(CHAIN_ARGS) $(ARGS)
	$(PY) -m tasks.cli show Detect --detect-images $(IMAGES) $(if $(MODEL),--detect-model $(MODEL)) $(CHAIN_ARGS) $(ARGS)

rerun: install ## rerun one stage and what depends on it: make rerun STAGE=SelectProposals [TARGET=PseudoLabels]
	@test -n "$(STAGE)" || (echo "usage: make rerun STAGE=<Task> [TARGET=<Task>] [VOC_ROOT=..] [ARGS=..]"; exit 2)
	$(PY) -m tasks.cli rerun $(STAGE) $(TARGET) $(DATA_ARGS) $(ARGS)

bench: bench-proposals bench-selection bench-cam bench-kill-resume bench-detector bench-speed bench-quality bench-proposal-free ## all benchmarks (each fails when its target is missed)

bench-proposals: install ## selective search: raw OpenCV vs the stage, 1 and 2 processes
	$(PY) bench/proposals.py

bench-selection: install ## click-only floors (median-size box, rank-1 proposal) on voc07-sample
	$(PY) bench/selection_floor.py

bench-cam: install ## CAM throughput: inference vs SA-CAM stage vs per-crop library-style loop
	$(PY) bench/cam_throughput.py

bench-quality: install ## pseudo-box quality table on voc07-sample, writes docs/results.md (long; see there)
	$(PY) bench/quality.py

bench-fusion-probe: install ## CAM fusion variants x T_cam on 500 voc07-sample clicks (after bench-quality; no target)
	$(PY) bench/fusion_probe.py

bench-kill-resume: install ## SIGKILL the pipeline inside every stage (several seeds), rerun, compare outputs
	$(PY) bench/kill_resume.py

bench-detector: install ## Fast R-CNN training s/iteration and test fps
	$(PY) bench/detector_speed.py

bench-detector-holdout: install ## fast/faster R-CNN on pseudo vs GT boxes, scored on 250 held-out voc07-sample images (long)
	$(PY) bench/detector_holdout.py

bench-proposal-free: install ## --proposals none vs the default chain from scratch per stage; single-pass CAM images/s
	$(PY) bench/proposal_free.py

bench-speed: install ## main job from scratch vs each stage's floor on voc07-sample (ARGS='--synthetic', '--limit 30')
	$(PY) bench/pipeline_speed.py $(ARGS)

clean-outputs: ## delete all stage outputs (outputs/*)
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

clean: clean-outputs ## delete outputs and the virtual environment
	rm -rf $(VENV) *.egg-info
