"""Reading a checkpoint given on the command line (``--ckpt_path``), with errors that say what is wrong.

torch's own errors on a bad file ("Weights only load failed ... please file an issue", "PytorchStreamReader
failed reading zip archive") name neither the file nor the likely cause. :func:`check_checkpoint` reads the
file first and raises :class:`CheckpointError` naming the file and one of:

* it does not exist, or is empty;
* it is not a PyTorch file at all (wrong file, e.g. a config or a log);
* it is a truncated or damaged archive (an interrupted save or copy);
* it is a PyTorch file but not a Lightning checkpoint (a bare ``state_dict``, a whole pickled model);
* it holds Python objects torch's safe loader refuses (not written by genzoo / Lightning);
* it was saved from another family (its ``hyper_parameters["_class_path"]``), or its weights do not fit the
  chosen model: missing / unexpected keys, or shapes that differ, with the hyperparameters that differ.

The file is read with ``torch.load(mmap=True, weights_only=True)``, so the check costs little even for a
large checkpoint; Lightning then loads it as usual.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # protocol >= 2: torch's legacy (pre-1.6) format starts with a pickle
NAMED_PATHS = ("last", "best", "hpc", "registry")  # Lightning resolves these itself


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the likely cause in the message."""


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path`` as a dict, or :class:`CheckpointError` saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {where}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({size} bytes, the zip archive's directory at its "
            "end is missing): the save or the copy was interrupted. Copy it again or use an earlier "
            "checkpoint (e.g. last.ckpt)"
        )
    if head != ZIP_MAGIC and not head.startswith(PICKLE_MAGIC):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {head!r}, not a zip archive or a pickle): "
            "not a genzoo / Lightning checkpoint. --ckpt_path takes a .ckpt file from a run's checkpoints/ "
            "folder"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = next((line for line in lines if "Unsupported global" in line), lines[-1])
        if "truncated" in str(e) or "ran out of input" in str(e).lower():
            raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes): {first}") from None
        raise CheckpointError(
            f"{path} holds Python objects that torch's safe loader refuses ({first}): it was not written "
            "by genzoo / Lightning (their checkpoints hold only tensors and plain values). If you trust it, "
            "load it yourself with torch.load(weights_only=False)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "data.pkl" in message or "constants.pkl" in message:
            raise CheckpointError(
                f"{path} is a zip archive but not a PyTorch file ({message}): not a genzoo / Lightning "
                "checkpoint"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({size} bytes; torch: {message}): the save or the "
            "copy was interrupted. Copy it again or use an earlier checkpoint (e.g. last.ckpt)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        held = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; it holds {held}). "
            "A bare state_dict loads with model.load_state_dict(torch.load(path)); --ckpt_path needs a "
            ".ckpt written by a genzoo run"
        )
    return checkpoint


def saved_class(checkpoint: dict) -> str | None:
    """The class path the CLI recorded in the checkpoint (``hyper_parameters["_class_path"]``), if any."""
    return (checkpoint.get("hyper_parameters") or {}).get("_class_path")


def _resolve(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_class(path: str | Path, checkpoint: dict, model_class: type | str) -> None:
    """Raise :class:`CheckpointError` if the checkpoint records a class (``_class_path``, written by the CLI)
    that is neither ``model_class`` nor a parent or child of it: a checkpoint of another family."""
    class_path = saved_class(checkpoint)
    if class_path is None:
        return
    ours = _resolve(model_class) if isinstance(model_class, str) else model_class
    name = model_class if isinstance(model_class, str) else f"{ours.__module__}.{ours.__name__}"
    theirs = _resolve(class_path)
    if ours is not None and theirs is not None:
        if issubclass(ours, theirs) or issubclass(theirs, ours):
            return
    elif class_path.rpartition(".")[2] == name.rpartition(".")[2]:
        return
    raise CheckpointError(
        f"checkpoint {path} was saved from {class_path}, but the model is {name}: a checkpoint of another "
        f"family. Use --model {class_path.rpartition('.')[2]} with the config that run saved (its "
        "config.yaml), or a checkpoint of this family"
    )


def check_weights(path: str | Path, checkpoint: dict, model: nn.Module) -> None:
    """Raise :class:`CheckpointError` if the checkpoint's weights do not fit ``model`` (missing or unexpected
    keys, other shapes), naming the hyperparameters that differ."""
    ours = type(model)
    class_path = saved_class(checkpoint)
    saved, expected = checkpoint["state_dict"], model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (checkpoint vs model: {'; '.join(shapes[:3])})")
    differ = hparams_that_differ(checkpoint, model)
    cause = (
        f"it was saved with other hyperparameters ({differ})"
        if differ
        else f"it was saved from another model{f' ({class_path})' if class_path else ''}"
    )
    raise CheckpointError(
        f"checkpoint {path} does not fit {ours.__name__}: {'; '.join(problems)}. Likely cause: {cause}. "
        "Run with the config that run saved (its config.yaml)"
    )


def hparams_that_differ(checkpoint: dict, model: nn.Module) -> str:
    """``"name: checkpoint X, model Y"`` for each saved hyperparameter that differs from the model's."""
    saved = checkpoint.get("hyper_parameters") or {}
    ours = getattr(model, "hparams", {}) or {}
    differ = []
    for key, value in saved.items():
        if key.startswith("_") or key not in ours:
            continue
        a, b = _plain(value), _plain(ours[key])
        if a != b:
            differ.append(f"{key}: checkpoint {value!r}, model {ours[key]!r}")
    return "; ".join(differ)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_checkpoint(path: str | Path, model: nn.Module) -> dict:
    """:func:`read_checkpoint`, :func:`check_class` and :func:`check_weights`: the checkpoint, or a
    :class:`CheckpointError`."""
    checkpoint = read_checkpoint(path)
    check_class(path, checkpoint, type(model))
    check_weights(path, checkpoint, model)
    return checkpoint


def is_local_path(ckpt_path) -> bool:
    """Whether ``--ckpt_path`` names a local file (not ``last`` / ``best`` / ..., not a URL)."""
    return bool(ckpt_path) and str(ckpt_path) not in NAMED_PATHS and "://" not in str(ckpt_path)
