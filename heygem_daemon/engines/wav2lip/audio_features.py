"""Wav2Lip's audio features: an 80-band mel spectrogram at 80 frames/s, and one 16-frame chunk per video frame.

Steps (16 kHz mono): pre-emphasis 0.97 -> centred STFT (n_fft 800, hop 200, periodic Hann 800) ->
magnitude -> Slaney mel filterbank (80 bands, 55-7600 Hz, Slaney area norm) -> 20*log10(max(1e-5, m)) - 20
-> clip(8 * (S + 100) / 100 - 4, -4, 4).

Centre padding: librosa >= 0.10 (0.11 included) pads with zeros (``pad_mode="constant"``), which is this
module's default. The 2019 reference stack (librosa 0.7) padded by reflection; pass ``pad_mode="reflect"``
to reproduce that. Only the first and last two mel frames differ between the two.

Everything after the filterbank construction is torch, so it runs on the GPU too. The arithmetic is
done in float64 (the audio is small) and the result is returned as float32. librosa is not used here.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from heygem_daemon.engines.base import BadInputError

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "WIN_LENGTH",
    "N_MELS",
    "MEL_STEP_SIZE",
    "MEL_FPS",
    "mel_filterbank",
    "melspectrogram",
    "chunk_starts",
    "frame_count",
    "mel_chunks",
    "chunks_at",
    "melspectrogram_long",
]

SAMPLE_RATE = 16000
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_STEP_SIZE = 16
MEL_FPS = SAMPLE_RATE / HOP_LENGTH  # 80 mel frames per second

PadMode = Literal["constant", "reflect"]


# --- Slaney mel scale (as librosa's default, htk=False) -------------------------------------------

_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_region = hz >= _MIN_LOG_HZ
    mel = np.where(log_region, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP, mel)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log_region = mel >= _MIN_LOG_MEL
    return np.where(log_region, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


@lru_cache(maxsize=8)
def _mel_filterbank_np(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels])  # Slaney: constant energy per band
    weights *= enorm[:, None]
    weights.setflags(write=False)
    return weights


def mel_filterbank(
    sr: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = FMIN,
    fmax: float = FMAX,
) -> np.ndarray:
    """Slaney-style mel filterbank (n_mels, 1 + n_fft // 2), float64, area-normalised (read-only)."""
    return _mel_filterbank_np(int(sr), int(n_fft), int(n_mels), float(fmin), float(fmax))


@lru_cache(maxsize=1)
def _mel_filterbank_torch() -> torch.Tensor:
    return torch.tensor(mel_filterbank(), dtype=torch.float64)  # a CPU copy; moved per call (tiny)


# --- Mel spectrogram -------------------------------------------------------------------------------


def _as_tensor(wav: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    if isinstance(wav, torch.Tensor):
        x = wav.detach()
    else:
        arr = np.asarray(wav)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise BadInputError(
                f"audio samples have dtype {arr.dtype}, expected float",
                hint="decode the audio to 16 kHz mono float32 first",
            )
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dim() == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.dim() != 1:
        raise BadInputError(
            f"audio must be mono (1-D samples), got shape {tuple(x.shape)}",
            hint="downmix to one channel at 16 kHz before computing features",
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise BadInputError(f"audio samples have dtype {x.dtype}, expected float")
    return x.to(device=device, dtype=torch.float64)


def melspectrogram(
    wav: np.ndarray | torch.Tensor,
    device: str | torch.device = "cpu",
    pad_mode: PadMode = "constant",
) -> torch.Tensor:
    """Normalised log-mel spectrogram of 16 kHz mono ``wav``: float32 tensor (80, T) on ``device``.

    ``T = 1 + len(wav) // 200``. Raises ``BadInputError`` for empty, non-mono, or non-finite audio.
    """
    x = _as_tensor(wav, device)
    n = x.shape[0]
    if n == 0:
        raise BadInputError("audio is empty (no samples)", hint="check that the audio file decodes to sound")
    if not bool(torch.isfinite(x).all()):
        raise BadInputError(
            "audio contains NaN or infinite samples; its mel spectrogram would be NaN",
            hint="re-encode the audio file; it is corrupt or was decoded wrongly",
        )
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")

    # Pre-emphasis: y[0] = x[0], y[n] = x[n] - 0.97 x[n-1]  (lfilter([1, -0.97], [1], x)).
    y = torch.cat((x[:1], x[1:] - PREEMPHASIS * x[:-1]))

    pad = N_FFT // 2
    if pad_mode == "reflect":
        if n <= pad:
            raise BadInputError(f"audio too short for reflect padding ({n} samples)")
        y = torch.nn.functional.pad(y[None, None], (pad, pad), mode="reflect")[0, 0]
    else:
        y = torch.nn.functional.pad(y, (pad, pad))  # zeros, as librosa >= 0.10

    window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float64, device=x.device)
    spec = torch.stft(
        y,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=window,
        center=False,
        return_complex=True,
    ).abs()  # (401, T)

    fb = _mel_filterbank_torch().to(device=x.device)
    mel = fb @ spec  # (80, T)

    min_level = math.pow(10.0, MIN_LEVEL_DB / 20.0)  # 1e-5
    s = 20.0 * torch.log10(torch.clamp(mel, min=min_level)) - REF_LEVEL_DB
    s = torch.clamp(
        (2.0 * MAX_ABS_VALUE) * ((s - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE,
        -MAX_ABS_VALUE,
        MAX_ABS_VALUE,
    )
    # torch.clamp would pass a NaN through; the reference rejects such audio.
    if bool(torch.isnan(s).any()):
        raise BadInputError(
            "mel spectrogram contains NaN; the audio is unusable",
            hint="re-encode the audio file; it is corrupt or was decoded wrongly",
        )
    return s.to(torch.float32)


# --- Per-video-frame chunks ------------------------------------------------------------------------


def _check(mel_frames: int, fps: float) -> None:
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise BadInputError(f"invalid video frame rate {fps!r}", hint="the portrait video reports no usable fps")
    if mel_frames < MEL_STEP_SIZE:
        raise BadInputError(
            f"audio too short: {mel_frames} mel frames, at least {MEL_STEP_SIZE} needed "
            f"(about {(MEL_STEP_SIZE - 1) * HOP_LENGTH / SAMPLE_RATE:.2f} s)",
            hint="supply a longer audio clip",
        )


def chunk_starts(mel_frames: int, fps: float) -> np.ndarray:
    """Start column of every chunk (int64), exactly as the reference loop picks them.

    Chunk i starts at ``int(i * (80. / fps))`` while that start + 16 fits in ``mel_frames``; the first
    start that does not fit is replaced by ``mel_frames - 16`` and ends the list.
    """
    _check(mel_frames, fps)
    fps = float(fps)
    mult = 80.0 / fps  # same float expression as the reference (i * mel_idx_multiplier)
    limit = mel_frames - MEL_STEP_SIZE
    # floor(i * mult) is monotone in i, so the valid i are a prefix; over-allocate a little and cut.
    n_candidates = int((limit + 1) / mult) + 2
    i = np.arange(n_candidates, dtype=np.float64)
    starts = np.floor(i * mult).astype(np.int64)
    n_valid = int(np.count_nonzero(starts <= limit))
    if n_valid == n_candidates:  # cannot happen with the margin above; guard anyway
        raise AssertionError("chunk start estimate too small")
    out = np.empty(n_valid + 1, dtype=np.int64)
    out[:n_valid] = starts[:n_valid]
    out[n_valid] = limit
    return out


def frame_count(mel_frames: int, fps: float) -> int:
    """Number of video frames (= mel chunks) the reference produces for ``mel_frames`` at ``fps``."""
    return int(chunk_starts(int(mel_frames), fps).shape[0])


def mel_chunks(mel: torch.Tensor, fps: float) -> torch.Tensor:
    """Cut ``mel`` (80, T) into one (1, 80, 16) window per video frame: (N, 1, 80, 16), same device/dtype.

    Vectorised: one gather over an ``unfold`` view, no Python loop over frames.
    """
    if mel.dim() != 2:
        raise ValueError(f"mel must be (n_mels, T), got shape {tuple(mel.shape)}")
    return chunks_at(mel, chunk_starts(int(mel.shape[1]), fps))


def chunks_at(mel: torch.Tensor, starts: np.ndarray) -> torch.Tensor:
    """The (1, 80, 16) windows of ``mel`` (80, T) beginning at ``starts``: (len(starts), 1, 80, 16).

    Lets a long clip be cut one batch of frames at a time instead of holding every chunk at once."""
    windows = mel.unfold(1, MEL_STEP_SIZE, 1)  # (80, T - 15, 16), a view
    chunks = windows.index_select(1, torch.as_tensor(starts, dtype=torch.int64, device=mel.device))
    return chunks.permute(1, 0, 2).unsqueeze(1).contiguous()


# Frames at a segment's start whose STFT window reaches its cut (zero padding, pre-emphasis of its first
# sample); they are computed again, with their true context, by the segment before.
_SEGMENT_LEAD = 3
SEGMENT_FRAMES = 6000  # 75 s of audio: about 40 MB of float64 STFT per segment


def melspectrogram_long(
    wav: np.ndarray, device: str | torch.device = "cpu", segment_frames: int = SEGMENT_FRAMES
) -> torch.Tensor:
    """``melspectrogram(wav)`` for audio of any length, computed ``segment_frames`` columns at a time.

    The whole-clip STFT of an hour of speech would take gigabytes (float64, 401 bins); each segment
    is cut with enough context that its columns are the ones the whole-clip computation gives."""
    n = len(wav)
    total = 1 + n // HOP_LENGTH
    if total <= segment_frames:
        return melspectrogram(wav, device)
    parts = []
    for first in range(0, total, segment_frames):
        count = min(segment_frames, total - first)
        lead = min(first, _SEGMENT_LEAD)
        start = (first - lead) * HOP_LENGTH
        # The last kept column's window ends N_FFT // 2 samples after its centre.
        stop = min(n, start + (lead + count - 1) * HOP_LENGTH + N_FFT // 2)
        parts.append(melspectrogram(wav[start:stop], device)[:, lead : lead + count])
    return torch.cat(parts, dim=1)
