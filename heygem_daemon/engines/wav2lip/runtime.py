"""The loaded Wav2Lip model on one device: inference settings, and batches that shrink on out-of-memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from heygem_daemon.engines.wav2lip.checkpoint import load_checkpoint
from heygem_daemon.engines.base import SetupError
from heygem_daemon.engines.wav2lip.face_batch import prepare_faces, to_frames
from heygem_daemon.engines.wav2lip.model import ConvTransposeUnit, ConvUnit, Wav2Lip
from heygem_daemon.log import get_logger

log = get_logger("heygem.wav2lip")
T = TypeVar("T")
# Measured on CPU (bench/wav2lip.py): 32 faces keep the activations in cache and run about a third
# faster per frame than 128; on a GPU the larger batch keeps the device busy.
BATCH_CPU, BATCH_CUDA = 32, 128


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class HalvingBatches:
    """Runs a function over a batch in slices; out-of-memory halves the slice size for the rest of the task."""

    def __init__(self, size: int, on_shrink: Callable[[], None] = lambda: None) -> None:
        self.size = size
        self.on_shrink = on_shrink

    def run(self, fn: Callable[[int, int], T], total: int) -> list[T]:
        """fn(start, stop) for consecutive slices covering 0..total; a slice that ran out of memory runs again
        smaller."""
        out: list[T] = []
        start = 0
        while start < total:
            stop = min(total, start + self.size)
            try:
                out.append(fn(start, stop))
                start = stop
                continue
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or self.size == 1:
                    raise
            # Outside the except block: the traceback no longer pins the failed batch's tensors,
            # so on_shrink can hand their memory back.
            self.size //= 2
            self.on_shrink()
            log.warning("out of memory; batch halved", batch=self.size)
        return out


def fold_batch_norm(model: Wav2Lip) -> Wav2Lip:
    """Fold each BatchNorm into the convolution before it: same outputs (eval mode), one pass fewer per layer."""
    for unit in model.modules():
        if isinstance(unit, (ConvUnit, ConvTransposeUnit)):
            conv, bn = unit.conv_block[0], unit.conv_block[1]
            if isinstance(bn, torch.nn.BatchNorm2d):
                transpose = isinstance(conv, torch.nn.ConvTranspose2d)
                unit.conv_block[0] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                unit.conv_block[1] = torch.nn.Identity()
    return model


def half_dtype(device: torch.device, fp16: bool | None) -> torch.dtype | None:
    """The autocast type: float16 on CUDA (auto: on), bfloat16 on CPU (auto: off; CPUs have no fast fp16)."""
    on = device.type == "cuda" if fp16 is None else fp16
    if not on:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass
class Predictor:
    """Mouth images for batches of face crops and mel chunks, on one device."""

    model: Wav2Lip
    device: torch.device
    half: torch.dtype | None
    channels_last: bool
    batches: HalvingBatches

    @classmethod
    def load(cls, checkpoint: Path, device: str, fp16: bool | None, channels_last: bool,
             batch_size: int | None) -> Predictor:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SetupError(f"{device} is configured but torch {torch.__version__} sees no CUDA device",
                             hint="install the CUDA build of torch and check nvidia-smi, or set workers.devices: [cpu]")
        model = fold_batch_norm(load_checkpoint(checkpoint, dev))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        size = batch_size or (BATCH_CUDA if dev.type == "cuda" else BATCH_CPU)
        empty = torch.cuda.empty_cache if dev.type == "cuda" else (lambda: None)
        return cls(model, dev, half_dtype(dev, fp16), channels_last, HalvingBatches(size, empty))

    @property
    def batch_size(self) -> int:
        return self.batches.size

    def pin(self, array: np.ndarray) -> torch.Tensor:
        """A CPU tensor ready for this device: page-locked on CUDA so the copy runs asynchronously."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def __call__(self, crops: torch.Tensor, mels: torch.Tensor) -> np.ndarray:
        """(B, 96, 96, 3) uint8 BGR crops + (B, 1, 80, 16) mels -> (B, 96, 96, 3) uint8 BGR mouths."""
        parts = self.batches.run(lambda a, b: self._infer(crops[a:b], mels[a:b]), len(crops))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, crops: torch.Tensor, mels: torch.Tensor) -> np.ndarray:
        autocast = (torch.autocast(self.device.type, dtype=self.half) if self.half is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            faces = prepare_faces(crops, device=self.device, channels_last=self.channels_last)
            mel = mels.to(self.device, non_blocking=True)
            return to_frames(self.model(mel, faces)).cpu().numpy()
