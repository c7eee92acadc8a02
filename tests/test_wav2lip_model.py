"""Wav2Lip generator network and checkpoint loading (CPU, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from heygem_daemon.engines.wav2lip.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from heygem_daemon.engines.wav2lip.model import Wav2Lip  # noqa: E402


def _randomised_model(seed: int = 0) -> Wav2Lip:
    torch.manual_seed(seed)
    model = Wav2Lip()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval outputs depend on them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    return _randomised_model()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 80, 16, generator=g), torch.rand(2, 6, 96, 96, generator=g)


@pytest.fixture(scope="module")
def reference_output(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "wav2lip.pth")


def test_parameter_count_is_36_3_million(model):
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 36.3e6) <= 0.1e6, n


@pytest.mark.parametrize(
    "key",
    [
        "face_encoder_blocks.0.0.conv_block.0.weight",
        "audio_encoder.0.conv_block.1.running_mean",
        "output_block.1.weight",
        "face_decoder_blocks.6.2.conv_block.1.running_var",
        "output_block.0.conv_block.0.weight",
    ],
)
def test_released_key_names_exist(model, key):
    assert key in model.state_dict()


def test_forward_gives_batch_of_3x96x96_in_unit_range(reference_output):
    assert reference_output.shape == (2, 3, 96, 96)
    assert float(reference_output.min()) >= 0.0 and float(reference_output.max()) <= 1.0


def test_forward_under_channels_last_matches(model, inputs, reference_output):
    mel, faces = (t.contiguous(memory_format=torch.channels_last) for t in inputs)
    cl = _randomised_model().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = cl(mel, faces)
    torch.testing.assert_close(out, reference_output, atol=1e-5, rtol=0)


def test_forward_under_bf16_autocast_is_close(model, inputs, reference_output):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs)
    assert out.shape == (2, 3, 96, 96)
    assert float((out.float() - reference_output).abs().max()) < 0.02


def test_saved_checkpoint_has_released_layout(saved):
    obj = torch.load(saved, map_location="cpu", weights_only=True)
    assert set(obj) == {"state_dict", "optimizer", "global_step", "global_epoch"}
    assert "face_encoder_blocks.0.0.conv_block.0.weight" in obj["state_dict"]


def test_checkpoint_round_trip_gives_identical_output(saved, inputs, reference_output):
    loaded = load_checkpoint(saved, "cpu")
    assert not loaded.training
    with torch.no_grad():
        out = loaded(*inputs)
    assert torch.equal(out, reference_output)


def test_checkpoint_with_module_prefix_loads_identically(model, inputs, reference_output, tmp_path):
    path = save_checkpoint(model, tmp_path / "dp.pth", data_parallel=True)
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    with torch.no_grad():
        out = load_checkpoint(path)(*inputs)
    assert torch.equal(out, reference_output)


def test_bare_state_dict_loads(model, inputs, reference_output, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        out = load_checkpoint(path)(*inputs)
    assert torch.equal(out, reference_output)


def test_missing_file_raises_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth.*not found"):
        load_checkpoint(path)


def test_text_file_raises_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth.*not a"):
        load_checkpoint(path)


def test_truncated_checkpoint_raises_checkpoint_error_naming_it(saved, tmp_path):
    path = tmp_path / "truncated.pth"
    with open(saved, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated.pth.*corrupted or truncated"):
        load_checkpoint(path)


def test_other_models_state_dict_raises_checkpoint_error_with_key_counts(tmp_path):
    class SyncNetLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.face_encoder = torch.nn.Sequential(torch.nn.Conv2d(15, 32, 3))
            self.audio_encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3))

    path = save_checkpoint(SyncNetLike(), tmp_path / "syncnet.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "syncnet.pth" in msg
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "SyncNet" in msg
    assert "\n" not in msg


def test_wrong_tensor_size_raises_checkpoint_error(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["output_block.1.weight"] = torch.zeros(3, 64, 1, 1)
    path = tmp_path / "resized.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="resized.pth.*wrong size.*output_block.1.weight"):
        load_checkpoint(path)


def test_dict_without_state_dict_raises_checkpoint_error(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"a": 1}, "global_step": 3}, path)
    with pytest.raises(CheckpointError, match="odd.pth.*without 'state_dict'"):
        load_checkpoint(path)


def test_package_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, heygem_daemon.engines.wav2lip; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_directory_path_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


