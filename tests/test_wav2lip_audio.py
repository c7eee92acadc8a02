"""Wav2Lip mel features and per-frame chunks, checked against librosa and the reference loop."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
librosa = pytest.importorskip("librosa")

from heygem_daemon.engines.base import BadInputError  # noqa: E402
from heygem_daemon.media.audio import load_mono  # noqa: E402
from media_factory import speech, write_wav  # noqa: E402
from heygem_daemon.engines.wav2lip.audio_features import (  # noqa: E402
    frame_count,
    mel_chunks,
    mel_filterbank,
    melspectrogram,
)

SR = 16000


def _speech_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Voiced harmonics with a wandering pitch, a syllable-rate envelope, and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 3.3 * t)) ** 2
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _near_silence(seconds: float = 2.0, seed: int = 1) -> np.ndarray:
    """Noise around -75 dBFS: part of the mel sits on the 1e-5 floor, part just above it."""
    return (2e-4 * np.random.default_rng(seed).standard_normal(int(SR * seconds))).astype(np.float32)


def _librosa_reference(wav: np.ndarray, pad_mode: str | None = None) -> np.ndarray:
    y = np.append(wav[0], wav[1:] - 0.97 * wav[:-1])
    kwargs = {} if pad_mode is None else {"pad_mode": pad_mode}  # None: librosa's own default
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, **kwargs))
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ spec
    s = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((s + 100) / 100) - 4, -4, 4)


def _reference_chunks(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    chunks = []
    mel_idx_multiplier = 80.0 / fps
    i = 0
    while True:
        start = int(i * mel_idx_multiplier)
        if start + 16 > mel.shape[1]:
            chunks.append(mel[:, mel.shape[1] - 16 :])
            break
        chunks.append(mel[:, start : start + 16])
        i += 1
    return chunks


def test_filterbank_equals_librosa_slaney():
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600, dtype=np.float64)
    np.testing.assert_allclose(mel_filterbank(), ref, rtol=0, atol=1e-12)


def test_mel_matches_librosa_on_speech_like_audio():
    wav = _speech_like()
    ours = melspectrogram(wav).numpy()
    ref = _librosa_reference(wav)
    assert ours.shape == ref.shape == (80, 1 + wav.size // 200)
    assert np.abs(ours - ref).max() < 1e-4


def _loud_stereo(path, rate: int):
    """Two different voices, one per channel, each peaking at 0.9: the reference averages them."""
    left, right = speech(2.0, rate), speech(2.0, rate, seed=3)
    return write_wav(path, np.stack([0.9 * left / np.abs(left).max(), 0.9 * right / np.abs(right).max()]), rate)


def test_mel_of_a_stereo_file_matches_the_reference_reading_it_with_librosa(tmp_path):
    wav = _loud_stereo(tmp_path / "stereo.wav", SR)
    ours = melspectrogram(load_mono(wav)).numpy()
    ref = _librosa_reference(librosa.load(wav, sr=SR)[0])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_mel_of_a_stereo_file_at_another_rate_equals_the_reference_reading_it_with_librosa(tmp_path, rate):
    # librosa.load resamples with soxr (HQ); FFmpeg's resampler moved bands 76-79 by up to 0.15 at 44.1 kHz.
    wav = _loud_stereo(tmp_path / "stereo.wav", rate)
    ours = melspectrogram(load_mono(wav)).numpy()
    ref = _librosa_reference(librosa.load(wav, sr=SR)[0])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


def test_mel_matches_librosa_on_near_silence():
    wav = _near_silence()
    ours = melspectrogram(wav).numpy()
    ref = _librosa_reference(wav)
    assert (ref > -4).any() and (ref == -4).any()  # the floor is actually exercised
    assert np.abs(ours - ref).max() < 1e-4


def test_mel_reflect_pad_matches_old_librosa_default():
    wav = _speech_like(1.0)
    ours = melspectrogram(wav, pad_mode="reflect").numpy()
    assert np.abs(ours - _librosa_reference(wav, pad_mode="reflect")).max() < 1e-4


def test_mel_accepts_tensor_input_and_returns_float32():
    wav = _speech_like(1.0)
    out = melspectrogram(torch.from_numpy(wav))
    assert out.dtype == torch.float32 and out.shape == (80, 81)
    assert torch.equal(out, melspectrogram(wav))


def test_nan_audio_raises_bad_input():
    wav = _speech_like(1.0)
    wav[1234] = np.nan
    with pytest.raises(BadInputError, match="NaN"):
        melspectrogram(wav)


def test_empty_audio_raises_bad_input():
    with pytest.raises(BadInputError, match="empty"):
        melspectrogram(np.zeros(0, dtype=np.float32))


def test_stereo_audio_raises_bad_input():
    with pytest.raises(BadInputError, match="mono"):
        melspectrogram(np.zeros((2, 16000), dtype=np.float32))


@pytest.mark.parametrize("fps", [25, 30, 24, 60, 29.97])
@pytest.mark.parametrize("mel_frames", [16, 17, 31, 81, 400, 1237, 4801])
def test_chunks_equal_reference_loop(fps, mel_frames):
    mel = torch.arange(80 * mel_frames, dtype=torch.float32).reshape(80, mel_frames)
    expected = _reference_chunks(mel.numpy(), fps)
    chunks = mel_chunks(mel, fps)
    assert frame_count(mel_frames, fps) == len(expected)
    assert chunks.shape == (len(expected), 1, 80, 16)
    np.testing.assert_array_equal(chunks[:, 0].numpy(), np.stack(expected))


def test_chunks_of_real_mel_keep_values():
    mel = melspectrogram(_speech_like(2.0))
    chunks = mel_chunks(mel, 25)
    assert chunks.shape[0] == frame_count(mel.shape[1], 25)
    assert torch.equal(chunks[3, 0], mel[:, int(3 * 80.0 / 25) : int(3 * 80.0 / 25) + 16])


def test_mel_shorter_than_one_chunk_raises_bad_input():
    with pytest.raises(BadInputError, match="too short"):
        mel_chunks(torch.zeros(80, 15), 25)


def test_invalid_fps_raises_bad_input():
    with pytest.raises(BadInputError, match="frame rate"):
        frame_count(100, 0)
