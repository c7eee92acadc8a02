"""Load and save Wav2Lip generator checkpoints in the released ``wav2lip.pth`` format.

The released files are ``{"state_dict": ..., "optimizer": ..., "global_step": ..., "global_epoch": ...}``
with keys possibly prefixed by ``module.`` (saved from DataParallel). A bare state_dict is accepted too.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from heygem_daemon.engines.wav2lip.model import Wav2Lip

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_PREFIX = "module."
_FIX = "download the Wav2Lip generator checkpoint (wav2lip.pth or wav2lip_gan.pth) again and point the config at it"


class CheckpointError(Exception):
    """The configured checkpoint file cannot be used (a configuration problem, not a task problem)."""


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")


def _guess_other_model(unexpected: list[str]) -> str:
    heads = {k.split(".", 1)[0] for k in unexpected}
    if "face_encoder" in heads:
        return " (this looks like a SyncNet lip-sync expert checkpoint, not the Wav2Lip generator)"
    if "binary_pred" in heads:
        return " (this looks like the visual-quality discriminator checkpoint, not the Wav2Lip generator)"
    return " (this looks like a different model, not the Wav2Lip generator)"


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a checkpoint dict with 'state_dict'; {_FIX}"
        )
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors; {_FIX}")
    elif obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        sd = obj  # a bare state_dict
    else:
        keys = [str(k) for k in list(obj.keys())]
        raise CheckpointError(
            f"{path}: a dict without 'state_dict' (top-level keys: {_few(keys, 5) or 'none'}); {_FIX}"
        )
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors ({_few(bad)}); {_FIX}")
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in sd.items()}


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Wav2Lip:
    """Load a released (or ``save_checkpoint``-written) Wav2Lip checkpoint; return the model in eval mode.

    Raises ``CheckpointError`` with a one-line message naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"{path}: checkpoint {what}; {_FIX}")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors, refused for safety (weights_only); "
                f"re-save only its state_dict with save_checkpoint from a trusted session, or {_FIX}"
            ) from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable: {_one_line(exc)}); {_FIX}") from exc
    except Exception as exc:  # torch.load fails in many ways on junk (IndexError, RuntimeError, EOFError...)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, corrupted or truncated ({_one_line(exc)}); {_FIX}"
        ) from exc

    sd = _extract_state_dict(obj, path)

    with torch.device("meta"):
        model = Wav2Lip()
    expected = model.state_dict()

    # BatchNorm's num_batches_tracked counters are unused at inference; files from old torch lack them.
    for k, v in expected.items():
        if k.endswith(".num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype, device=device)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        guess = _guess_other_model(unexpected) if unexpected else ""
        raise CheckpointError(f"{path}: not a Wav2Lip generator state_dict: {'; '.join(parts)}{guess}; {_FIX}")

    mismatched = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path}: {len(mismatched)} tensors have the wrong size ({_few(mismatched, 2)}); "
            f"this is a different Wav2Lip variant (e.g. a 256-px model); {_FIX}"
        )

    # Parameters and running stats in float32 whatever the file stored (some conversions are half).
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:  # pragma: no cover - pre-checked above
        raise CheckpointError(f"{path}: state_dict does not fit the model ({_one_line(exc)}); {_FIX}") from exc
    return model.to(device).eval()


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike[str], data_parallel: bool = False) -> Path:
    """Write ``model``'s weights in the released format; ``data_parallel`` adds the ``module.`` prefix."""
    path = Path(path)
    inner = getattr(model, "module", model)  # unwrap DataParallel / DDP
    sd = {k: v.detach().to("cpu") for k, v in inner.state_dict().items()}
    if data_parallel:
        sd = {_PREFIX + k: v for k, v in sd.items()}
    payload = {"state_dict": sd, "optimizer": {}, "global_step": 0, "global_epoch": 0}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _one_line(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
