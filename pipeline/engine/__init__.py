"""The training engine: one fit loop (:mod:`.fit`), one checkpoint format (:mod:`.checkpoint`) and the layer
helpers every trainer uses (:mod:`.layers`). :func:`pipeline.classifier.train_classifier` and
:func:`pipeline.detector.train_detector` are a model, an optimizer and a :class:`TrainTask` handed to :func:`fit`."""
from .checkpoint import (CheckpointError, args_diff, check_args, check_plain, load_checkpoint, save_checkpoint,
                         strip_checkpoint)
from .fit import EpochStats, FitSpec, NonFiniteLossError, Step, TrainTask, epoch_seed, fit, rank_weight
from .layers import batchnorm_layers, freeze_batchnorm, normalize

__all__ = ["CheckpointError", "EpochStats", "FitSpec", "NonFiniteLossError", "Step", "TrainTask", "args_diff",
           "batchnorm_layers", "check_args", "check_plain", "epoch_seed", "fit", "freeze_batchnorm",
           "load_checkpoint", "normalize", "rank_weight", "save_checkpoint", "strip_checkpoint"]
