"""Training checkpoints: one dict per file, torchvision references style
(``{model, optimizer, lr_scheduler, scaler, epoch, args, log}`` plus a trainer's own entries), written atomically and
read back with ``torch.load(..., weights_only=True)``.

A checkpoint holds only tensors, numbers, strings, ``None``, lists, tuples and dicts (``OrderedDict`` and
``collections.Counter`` included: state dicts and ``MultiStepLR``'s milestones), which is what PyTorch's
weights-only unpickler reads: loading one never runs code from the file. :func:`save_checkpoint` refuses anything
else (naming where it sits) before writing, so a checkpoint that was written can always be read.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..io import atomic_path

#: the containers and leaves a checkpoint may hold (exact types: a numpy float is not a float here)
_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple)
#: entries a finished run no longer needs (:func:`strip_checkpoint`)
TRAINING_STATE = ("optimizer", "lr_scheduler", "scaler")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run that wants it."""


def check_plain(obj, where: str = "checkpoint") -> None:
    """TypeError naming the first entry of ``obj`` that the weights-only unpickler could not read back."""
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAVES:
        return
    if type(obj) in _MAPPINGS:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} (only str and int keys are stored)")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in _SEQUENCES:
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint stores only tensors, "
                    "numbers, strings, None, lists, tuples and dicts")


def save_checkpoint(path: str | os.PathLike, state: Mapping) -> Path:
    """Write ``state`` to ``path`` atomically (a killed process leaves the previous file)."""
    check_plain(dict(state), str(path))
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, error: type[Exception] = CheckpointError,
                    hint: str = "") -> dict:
    """The dict at ``path``, read with ``weights_only=True``. A missing file is a FileNotFoundError; anything
    unreadable (truncated, not a dict, holding other objects) is ``error`` naming the file (and ``hint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
        raise error(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}){hint}") from None
    if not isinstance(ckpt, dict):
        raise error(f"{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict){hint}")
    return ckpt


def strip_checkpoint(path: str | os.PathLike, *, error: type[Exception] = CheckpointError) -> Path:
    """Drop the optimizer / scheduler / scaler state from a finished run's checkpoint (atomically)."""
    ckpt = load_checkpoint(path, error=error)
    for k in TRAINING_STATE:
        ckpt.pop(k, None)
    return save_checkpoint(path, ckpt)


def args_diff(saved: Mapping, wanted: Mapping, ignore: Sequence[str] = ()) -> dict[str, tuple]:
    """``{key: (saved value, wanted value)}`` for every key, outside ``ignore``, whose values differ (a key missing
    on one side counts as ``None`` there)."""
    keys = (set(saved) | set(wanted)) - set(ignore)
    return {k: (saved.get(k), wanted.get(k)) for k in sorted(keys) if saved.get(k) != wanted.get(k)}


def check_args(path: str | os.PathLike, ckpt: Mapping, args: Mapping, *, ignore: Sequence[str] = (),
               extra: Mapping | None = None, error: type[Exception] = CheckpointError) -> None:
    """``error`` naming every differing key when the checkpoint's ``args`` (outside ``ignore``: fields that do not
    change the result) or its ``extra`` entries (e.g. ``classes``) are not those of this run."""
    diff = args_diff(ckpt.get("args") or {}, args, ignore)
    if diff:
        raise error(f"{path}: checkpoint was written with other training arguments "
                    f"{ {k: f'{a} (checkpoint) != {b}' for k, (a, b) in diff.items()} }; "
                    "delete it or train in another directory")
    for key, want in (extra or {}).items():
        if ckpt.get(key) != want:
            raise error(f"{path}: checkpoint {key} {ckpt.get(key)} differ from this run's {want}; delete it or train "
                        "in another directory")
