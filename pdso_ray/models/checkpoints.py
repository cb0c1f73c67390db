"""Checkpoint loading shared by the model builders (DINO, SAM): safe deserialisation, clear errors.

Checkpoints are read through :class:`pdso_ray.storage.Storage` (any URL) and deserialised without
executing code: ``torch.load(..., weights_only=True)`` for ``.pth``/``.pt``/``.bin`` files and
``safetensors`` for ``.safetensors`` files. Every error names the URL.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Mapping

import torch
from torch import nn

from pdso_ray.storage import Storage

# DINO's and timm's training scripts pickle their argparse arguments beside the weights. A Namespace
# only holds attributes (whose values the weights-only unpickler still restricts), so allowing it
# lets full training checkpoints load without opening the door to arbitrary code.
_SAFE_GLOBALS = [argparse.Namespace]

_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A file that is not a weights-only checkpoint of the expected model; the message names the
    file and, for a mismatch, the keys."""


def load_state_dict_from_url(url: str, storage: Storage | None = None, hint: str = "") -> dict:
    """Read and deserialise the checkpoint at ``url`` (weights only; never executes pickled code).

    Args:
        url: path or URL of the file (anything :class:`Storage` reads).
        storage: the run's storage; ``None`` = local defaults.
        hint: appended to a "not found" message, e.g. where to download the file from.

    Returns:
        The deserialised top-level object, which must be a dict (a state dict, or a training
        checkpoint holding one under a key such as ``teacher`` or ``state_dict``).

    Raises:
        FileNotFoundError: the file does not exist (message names the URL and what to do).
        CheckpointError: the file is not a readable weights-only checkpoint, or is not a dict.
    """
    storage = storage or Storage()
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        msg = f"checkpoint not found: {url}. Put the checkpoint file at this path or URL"
        raise FileNotFoundError(f"{msg}; {hint}" if hint else f"{msg}.") from None
    try:
        if url.lower().endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            obj = load_safetensors(data)
        else:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any deserialisation failure means "not a checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {url} ({len(data)} bytes) as weights only: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {url} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], url: str) -> None:
    """Raise a :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes.

    The message names the checkpoint and lists (at most 10 of each) missing keys, unexpected keys
    and shape mismatches, with their counts, so a wrong file or architecture is obvious.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(getattr(v, "shape", ())) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"checkpoint {url} does not match the model ({type(model).__name__}):"]
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:_MAX_LISTED])}{more}")
    raise CheckpointError(parts[0] + " " + "; ".join(parts[1:]))
