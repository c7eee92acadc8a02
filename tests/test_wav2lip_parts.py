"""The parts of the Wav2Lip engine below the daemon: long-audio mel, frame timing, face boxes and their
cache, the stage pipeline, out-of-memory halving, settings, encoder choice and doctor."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from config_examples import commented_engine_example  # noqa: E402
from heygem_daemon.config import ConfigError, Preset, load_config  # noqa: E402
from heygem_daemon.engines.base import BadInputError, TaskSpec  # noqa: E402
from heygem_daemon.engines.registry import check_engines  # noqa: E402
from heygem_daemon.engines.wav2lip.audio_features import chunk_starts, melspectrogram, melspectrogram_long  # noqa: E402
from heygem_daemon.engines.wav2lip.boxes import MISSING, BoxCache, finish_boxes, smooth  # noqa: E402
from heygem_daemon.engines.wav2lip.checkpoint import save_checkpoint  # noqa: E402
from heygem_daemon.engines.base import SetupError  # noqa: E402
from heygem_daemon.engines.wav2lip.engine import Wav2LipEngine  # noqa: E402
from heygem_daemon.engines.wav2lip.model import Wav2Lip  # noqa: E402
from heygem_daemon.engines.wav2lip.render import encoder_for, frame_starts  # noqa: E402
from heygem_daemon.engines.wav2lip.runtime import HalvingBatches, fold_batch_norm  # noqa: E402
from heygem_daemon.engines.wav2lip.stages import staged  # noqa: E402
from heygem_daemon.media.writer import encoder_usable  # noqa: E402
from media_factory import speech, write_speech_wav  # noqa: E402

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"


# --- audio ------------------------------------------------------------------------------------------

def test_long_audio_mel_in_segments_equals_the_whole_clip_mel() -> None:
    wav = speech(7.3)
    whole = melspectrogram(wav)
    assert torch.equal(melspectrogram_long(wav, segment_frames=100), whole)


def test_frames_start_with_the_reference_chunks_and_cover_the_whole_audio() -> None:
    samples = int(1.2 * 16000)
    starts = frame_starts(samples, 25)
    reference = chunk_starts(1 + samples // 200, 25)
    assert len(starts) == 30 and len(reference) < 30
    assert np.array_equal(starts[: len(reference)], reference)
    assert (starts[len(reference):] == reference[-1]).all()


# --- face boxes -------------------------------------------------------------------------------------

def _reference_smoothing(boxes: np.ndarray, window: int) -> np.ndarray:
    """The loop from the reference notes, written out plainly."""
    out = boxes.astype(np.float64).copy()
    for i in range(len(boxes)):
        part = boxes[len(boxes) - window:] if i + window > len(boxes) else boxes[i : i + window]
        out[i] = np.mean(part, axis=0)
    return out


def test_box_smoothing_matches_the_reference_moving_mean() -> None:
    boxes = np.random.default_rng(0).integers(0, 200, size=(23, 4)).astype(np.float64)
    np.testing.assert_allclose(smooth(boxes, 5), _reference_smoothing(boxes, 5))


def test_frames_without_a_detection_get_a_box_between_their_neighbours() -> None:
    raw = np.array([[10, 10, 20, 20], [MISSING] * 4, [20, 10, 20, 20]], dtype=np.int32)
    boxes = finish_boxes(raw, (100, 100), (0, 0, 0, 0), smooth_frames=1)
    assert boxes is not None and boxes[1].tolist() == [15, 10, 35, 30]


def test_pads_grow_the_box_and_stop_at_the_frame_edge() -> None:
    raw = np.array([[5, 10, 20, 20]], dtype=np.int32)
    boxes = finish_boxes(raw, (40, 35), (3, 10, 8, 4), smooth_frames=5)
    assert boxes is not None and boxes[0].tolist() == [0, 7, 29, 35]


def test_no_detection_in_any_frame_gives_no_boxes() -> None:
    assert finish_boxes(np.full((4, 4), MISSING, dtype=np.int32), (64, 64), (0, 10, 0, 0), 5) is None


def test_box_cache_returns_what_was_saved(tmp_path: Path) -> None:
    cache = BoxCache(tmp_path / "boxes", max_age_days=7)
    raw = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert cache.load("k") is None
    cache.save("k", raw)
    assert np.array_equal(cache.load("k"), raw)


def test_box_cache_treats_a_damaged_entry_as_a_miss(tmp_path: Path) -> None:
    cache = BoxCache(tmp_path, max_age_days=7)
    (tmp_path / "k.npy").write_bytes(b"\x93NUMPY garbage")
    assert cache.load("k") is None


def test_box_cache_drops_entries_unused_for_longer_than_its_age_limit(tmp_path: Path) -> None:
    cache = BoxCache(tmp_path, max_age_days=1)
    cache.save("old", np.zeros((1, 4), np.int32))
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / "old.npy", (two_days_ago, two_days_ago))
    cache.save("new", np.zeros((1, 4), np.int32))
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["new.npy"]


# --- stages -----------------------------------------------------------------------------------------

def test_stages_deliver_every_item_through_every_step_in_order() -> None:
    out = list(staged(range(50), [lambda x: x * 2, lambda x: x + 1], depth=2))
    assert out == [x * 2 + 1 for x in range(50)]


def test_an_exception_in_a_step_reaches_the_consumer() -> None:
    def step(x: int) -> int:
        if x == 7:
            raise BadInputError("item 7 is bad")
        return x

    with pytest.raises(BadInputError, match="item 7"):
        list(staged(range(20), [step]))


def test_an_exception_in_the_source_reaches_the_consumer() -> None:
    def source():
        yield 1
        raise ValueError("decoder broke")

    with pytest.raises(ValueError, match="decoder broke"):
        list(staged(source(), [lambda x: x]))


def test_the_source_runs_only_a_bounded_distance_ahead_of_the_consumer() -> None:
    made: list[int] = []

    def source():
        for i in range(1000):
            made.append(i)
            yield i

    items = staged(source(), [lambda x: x], depth=2)
    next(items)
    time.sleep(0.5)  # let the threads run as far ahead as the queues let them
    # two queues of 2, one item inside the step and one waiting in the source's put
    assert len(made) <= 1 + 2 + 2 + 1 + 1
    items.close()


def test_stopping_early_ends_the_stage_threads() -> None:
    before = threading.active_count()
    items = staged(iter(range(10_000)), [lambda x: x], depth=2)
    next(items)
    items.close()
    assert threading.active_count() == before


# --- out of memory ----------------------------------------------------------------------------------

class _SmallDevice:
    """A callable that fails like CUDA does when asked for more than `limit` items at once."""

    def __init__(self, limit: int, message: str = OOM) -> None:
        self.limit, self.message, self.calls = limit, message, []

    def __call__(self, start: int, stop: int) -> list[int]:
        self.calls.append((start, stop))
        if stop - start > self.limit:
            raise RuntimeError(self.message)
        return list(range(start, stop))


def test_out_of_memory_halves_the_batch_and_finishes_every_item() -> None:
    device, shrinks = _SmallDevice(limit=3), []
    batches = HalvingBatches(8, on_shrink=lambda: shrinks.append(1))
    parts = batches.run(device, 11)
    assert sum(parts, []) == list(range(11))
    assert batches.size == 2 and len(shrinks) == 2


def test_the_halved_batch_size_is_kept_for_later_batches() -> None:
    device = _SmallDevice(limit=4)
    batches = HalvingBatches(8)
    batches.run(device, 8)
    device.calls.clear()
    batches.run(device, 8)
    assert device.calls == [(0, 4), (4, 8)]


def test_other_runtime_errors_are_not_taken_for_out_of_memory() -> None:
    with pytest.raises(RuntimeError, match="shape mismatch"):
        HalvingBatches(8).run(_SmallDevice(limit=3, message="shape mismatch"), 8)


def test_out_of_memory_with_a_batch_of_one_is_raised() -> None:
    with pytest.raises(RuntimeError, match="out of memory"):
        HalvingBatches(2).run(_SmallDevice(limit=0), 4)


# --- model execution --------------------------------------------------------------------------------

def test_folding_batch_norm_into_convolutions_keeps_the_output() -> None:
    torch.manual_seed(0)
    model = Wav2Lip().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        mel, faces = torch.randn(2, 1, 80, 16), torch.rand(2, 6, 96, 96)
        before = model(mel, faces)
        after = fold_batch_norm(model)(mel, faces)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# --- settings, set-up errors, encoder, doctor -------------------------------------------------------

def _config(tmp_path: Path, wav2lip: dict) -> Path:
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"engine": {"name": "wav2lip"}, "engines": {"wav2lip": wav2lip}}))
    return path


def test_a_relative_checkpoint_path_stops_start_up_with_the_key_named(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, {"checkpoint": "models/wav2lip.pth"}), environ={})
    with pytest.raises(ConfigError, match="engines.wav2lip.checkpoint: .*absolute path"):
        check_engines(cfg)


def test_an_unknown_wav2lip_key_stops_start_up(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, {"batchsize": 16}), environ={})
    with pytest.raises(ConfigError, match="engines.wav2lip.batchsize: unknown key"):
        check_engines(cfg)


def test_engine_module_does_not_import_torch_in_the_daemon() -> None:
    code = ("import sys; from heygem_daemon.engines.registry import needs_face; assert needs_face('wav2lip'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _task(tmp_path: Path, portrait: Path) -> TaskSpec:
    work = tmp_path / "work" / "job" / "task-1"
    work.mkdir(parents=True, exist_ok=True)
    audio = write_speech_wav(tmp_path / "voice.wav", 0.5)
    return TaskSpec(1, "job", "clip", audio, portrait, tmp_path / "out.mp4.part", work,
                    Preset(height=160, fps=25, video_bitrate=300_000))


def test_no_checkpoint_configured_fails_the_task_at_once_naming_the_key(tmp_path: Path, portrait_jpg: Path) -> None:
    engine = Wav2LipEngine(Wav2LipEngine.Settings())
    with pytest.raises(SetupError, match="set engines.wav2lip.checkpoint") as err:
        engine.generate(_task(tmp_path, portrait_jpg), lambda _f: None)
    assert not err.value.kind.retried and "retry" in err.value.hint


def test_a_portrait_without_a_face_is_bad_input_found_before_the_model_loads(tmp_path: Path, no_face_jpg: Path) -> None:
    engine = Wav2LipEngine(Wav2LipEngine.Settings())  # no checkpoint: loading it would fail differently
    with pytest.raises(BadInputError, match="no face found in no_face.jpg") as err:
        engine.generate(_task(tmp_path, no_face_jpg), lambda _f: None)
    assert err.value.hint and not err.value.kind.retried


def test_auto_encoder_on_cpu_is_the_software_encoder_of_the_presets_codec() -> None:
    assert encoder_for("h264", "auto", "cpu") == "libx264"
    assert encoder_for("hevc", "auto", "cpu") == "libx265"
    assert encoder_for("hevc", "software", "cuda:0") == "libx265"


def test_encoder_names_from_older_configs_still_load() -> None:
    assert Wav2LipEngine.Settings(encoder="libx264").encoder == "software"
    assert Wav2LipEngine.Settings(encoder="h264_nvenc").encoder == "nvenc"


@pytest.mark.skipif(encoder_usable("hevc_nvenc"), reason="this machine can open hevc_nvenc")
def test_configured_nvenc_that_cannot_open_fails_with_the_setting_to_change() -> None:
    with pytest.raises(SetupError, match="hevc_nvenc") as err:
        encoder_for("hevc", "nvenc", "cuda:0")
    assert "engines.wav2lip.encoder" in err.value.hint


def test_doctor_reports_a_loading_checkpoint_and_the_cpu(tmp_path: Path) -> None:
    path = save_checkpoint(Wav2Lip(), tmp_path / "wav2lip.pth")
    checks = Wav2LipEngine.doctor(Wav2LipEngine.Settings(checkpoint=path), ["cpu"])
    assert [c.ok for c in checks] == [True, True, True]
    assert "36.3 M parameters" in checks[0].detail and "float32" in checks[1].detail


def test_doctor_names_a_missing_checkpoint_and_the_fix(tmp_path: Path) -> None:
    check = Wav2LipEngine.doctor(Wav2LipEngine.Settings(checkpoint=tmp_path / "gone.pth"), ["cpu"])[0]
    assert not check.ok and "gone.pth" in check.detail and "engines.wav2lip.checkpoint" in check.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_doctor_says_when_a_configured_gpu_is_not_visible() -> None:
    check = Wav2LipEngine.doctor(Wav2LipEngine.Settings(), ["cuda:0"])[1]
    assert not check.ok and "CUDA not available" in check.detail and "workers.devices" in check.fix


def test_the_commented_example_in_config_yaml_is_valid_when_uncommented() -> None:
    example = commented_engine_example("wav2lip")
    settings = Wav2LipEngine.Settings.model_validate(example)
    assert set(example) == set(Wav2LipEngine.Settings.model_fields)  # every setting is documented
    assert settings.checkpoint == Path("/srv/heygem/models/wav2lip_gan.pth")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_worker_without_cuda_fails_the_task_with_the_setting_to_change(tmp_path: Path,
                                                                              portrait_jpg: Path) -> None:
    path = save_checkpoint(Wav2Lip(), tmp_path / "wav2lip.pth")
    task = _task(tmp_path, portrait_jpg)
    engine = Wav2LipEngine(Wav2LipEngine.Settings(checkpoint=path))
    with pytest.raises(SetupError, match="cuda:0 is configured but .* no CUDA device") as err:
        engine.generate(dataclasses.replace(task, device="cuda:0"), lambda _f: None)
    assert "workers.devices" in err.value.hint and not err.value.kind.retried
