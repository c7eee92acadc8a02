"""`heygem-daemon doctor` lines for wav2lip: does the checkpoint load, which devices and encoder will be used."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from heygem_daemon.ops.checks import Check
from heygem_daemon.engines.wav2lip.checkpoint import CheckpointError, load_checkpoint
from heygem_daemon.engines.wav2lip.engine import CHECKPOINT_KEY
from heygem_daemon.engines.wav2lip.runtime import BATCH_CPU, BATCH_CUDA, half_dtype
from heygem_daemon.media.writer import NVENC, encoder_usable, pick_encoder

if TYPE_CHECKING:
    from heygem_daemon.engines.wav2lip.engine import Wav2LipEngine


def check_checkpoint(settings: Wav2LipEngine.Settings) -> Check:
    path = settings.checkpoint
    if path is None:
        return Check("wav2lip checkpoint", False, "not configured",
                     f"set {CHECKPOINT_KEY} to the absolute path of wav2lip_gan.pth or wav2lip.pth")
    try:
        model = load_checkpoint(path, "cpu")  # strict: every key and shape must match
    except CheckpointError as exc:
        return Check("wav2lip checkpoint", False, str(exc), f"fix {CHECKPOINT_KEY} or replace the file")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Check("wav2lip checkpoint", True, f"{path} loads strictly ({params:.1f} M parameters)")


def check_device(settings: Wav2LipEngine.Settings, device: str) -> Check:
    name = f"wav2lip device {device}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return Check(name, False, f"CUDA not available to torch {torch.__version__}",
                         "install the CUDA build of torch and check nvidia-smi, or set workers.devices: [cpu]")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            return Check(name, False, f"only {torch.cuda.device_count()} CUDA device(s) visible",
                         "fix workers.devices (or CUDA_VISIBLE_DEVICES)")
        what = torch.cuda.get_device_name(index)
    else:
        what = f"CPU, {torch.get_num_threads()} threads (slow: for tests and machines without a GPU)"
    half = half_dtype(dev, settings.fp16)
    batch = settings.batch_size or (BATCH_CUDA if dev.type == "cuda" else BATCH_CPU)
    precision = str(half).removeprefix("torch.") if half else "float32"
    return Check(name, True, f"{what}; {precision}, batch {batch}")


def check_encoder(settings: Wav2LipEngine.Settings, devices: list[str]) -> Check:
    usable = {name: encoder_usable(name) for name in NVENC.values()}
    shown = ", ".join(f"{name} {'usable' if ok else 'not usable'}" for name, ok in usable.items())
    if settings.encoder == "nvenc" and not all(usable.values()):
        return Check("wav2lip encoder", False, f"nvenc configured but not every NVENC encoder opens here ({shown})",
                     "check the NVIDIA driver, or set engines.wav2lip.encoder to auto or software")
    if settings.encoder == "software":
        return Check("wav2lip encoder", True, "libx264 / libx265 by preset (configured: software)")
    device = next((d for d in devices if d.startswith("cuda")), "cpu") if settings.encoder == "auto" else "cuda"
    chosen = " / ".join(dict.fromkeys(pick_encoder(codec, settings.encoder, device) for codec in NVENC))
    return Check("wav2lip encoder", True, f"{chosen} by preset ({settings.encoder}; {shown})")


def doctor(settings: Wav2LipEngine.Settings, devices: list[str]) -> list[Check]:
    return [check_checkpoint(settings), *(check_device(settings, d) for d in devices),
            check_encoder(settings, devices)]
