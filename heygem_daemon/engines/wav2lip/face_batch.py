"""Face crops to Wav2Lip model input, and model output back to pixels (torch ops; GPU-friendly).

Crops are 96x96 BGR uint8 (the channel order the model was trained on). The model input holds a copy
with its lower half (rows 48:) blacked out in channels 0-2, then the unmasked crop in channels 3-5,
scaled to [0, 1]: (B, 6, 96, 96).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["prepare_faces", "to_frames"]

FACE_SIZE = 96
_HALF = FACE_SIZE // 2


def prepare_faces(
    crops_bgr_uint8: np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """(B, 96, 96, 3) uint8 BGR crops -> (B, 6, 96, 96) ``dtype`` in [0, 1] on ``device``.

    ``device`` defaults to where a tensor input already is (CPU for numpy). The uint8 data is moved
    first and converted on the device (4x less to copy). ``channels_last`` returns that memory format.
    """
    x = crops_bgr_uint8 if isinstance(crops_bgr_uint8, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(crops_bgr_uint8)
    )
    if x.dim() != 4 or tuple(x.shape[1:]) != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"crops must be (B, {FACE_SIZE}, {FACE_SIZE}, 3), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8 BGR, got {x.dtype}")
    if device is not None:
        x = x.to(device, non_blocking=True)

    faces = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # (B, 3, 96, 96)
    masked = faces.clone()
    masked[:, :, _HALF:, :] = 0.0
    out = torch.cat((masked, faces), dim=1).to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def to_frames(pred: torch.Tensor) -> torch.Tensor:
    """(B, 3, 96, 96) model output in [0, 1] -> (B, 96, 96, 3) uint8 BGR on the same device.

    Values are scaled by 255 and rounded to nearest (the reference truncated after resizing in float);
    NaN becomes 0.
    """
    if pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred must be (B, 3, H, W), got {tuple(pred.shape)}")
    pix = (torch.nan_to_num(pred.detach().to(torch.float32), nan=0.0)
           .mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8))
    return pix.permute(0, 2, 3, 1).contiguous()
