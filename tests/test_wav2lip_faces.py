"""Face crops to Wav2Lip input and output back to pixels."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from heygem_daemon.engines.wav2lip.face_batch import prepare_faces, to_frames  # noqa: E402


def _crops(b: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(b, 96, 96, 3), dtype=np.uint8)


def test_prepare_faces_masks_lower_half_first_then_full_crop():
    crops = _crops()
    out = prepare_faces(crops)
    assert out.shape == (3, 6, 96, 96) and out.dtype == torch.float32
    full = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(out[:, 3:], full)
    assert torch.equal(out[:, :3, :48], full[:, :, :48])
    assert torch.count_nonzero(out[:, :3, 48:]) == 0


def test_prepare_faces_accepts_tensor_and_channels_last():
    crops = _crops()
    out = prepare_faces(torch.from_numpy(crops), channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, prepare_faces(crops))


def test_prepare_faces_rejects_wrong_shape():
    with pytest.raises(ValueError):
        prepare_faces(np.zeros((2, 64, 64, 3), dtype=np.uint8))


def test_to_frames_inverts_scaling_to_bgr_uint8():
    crops = _crops()
    pred = prepare_faces(crops)[:, 3:]
    frames = to_frames(pred)
    assert frames.dtype == torch.uint8 and frames.shape == (3, 96, 96, 3)
    np.testing.assert_array_equal(frames.numpy(), crops)
