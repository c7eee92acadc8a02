"""The Wav2Lip generator, laid out so the released checkpoints load with ``strict=True``.

Written from the layer-by-layer description in the reference notes (not from the original code).
Every convolution unit keeps its layers in an ``nn.Sequential`` named ``conv_block`` so state-dict keys
read ``<block>.<index>.conv_block.{0,1}.*`` (0 = convolution, 1 = batch norm), as in the released files.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvUnit", "ConvTransposeUnit", "Wav2Lip", "MEL_BINS", "MEL_STEPS", "FACE_SIZE"]

MEL_BINS = 80
MEL_STEPS = 16
FACE_SIZE = 96


class ConvUnit(nn.Module):
    """Conv2d + BatchNorm2d + ReLU; with ``residual=True`` the input is added before the ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and (cin != cout or stride not in (1, (1, 1))):
            raise ValueError("a residual unit keeps its shape: cin == cout and stride 1")
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class ConvTransposeUnit(nn.Module):
    """ConvTranspose2d + BatchNorm2d + ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int,
        padding: int,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _res(ch: int) -> ConvUnit:
    return ConvUnit(ch, ch, 3, 1, 1, residual=True)


class Wav2Lip(nn.Module):
    """Generator: ``forward(mel (B,1,80,16), faces (B,6,96,96)) -> (B,3,96,96)`` in [0, 1].

    ``faces`` holds the lower-half-masked crop in channels 0-2 and the reference crop in channels 3-5
    (BGR, scaled to [0, 1]); see ``face_batch.prepare_faces``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(6, 16, 7, 1, 3)),  # 96x96
                nn.Sequential(ConvUnit(16, 32, 3, 2, 1), _res(32), _res(32)),  # 48x48
                nn.Sequential(ConvUnit(32, 64, 3, 2, 1), _res(64), _res(64), _res(64)),  # 24x24
                nn.Sequential(ConvUnit(64, 128, 3, 2, 1), _res(128), _res(128)),  # 12x12
                nn.Sequential(ConvUnit(128, 256, 3, 2, 1), _res(256), _res(256)),  # 6x6
                nn.Sequential(ConvUnit(256, 512, 3, 2, 1), _res(512)),  # 3x3
                nn.Sequential(ConvUnit(512, 512, 3, 1, 0), ConvUnit(512, 512, 1, 1, 0)),  # 1x1
            ]
        )

        self.audio_encoder = nn.Sequential(
            ConvUnit(1, 32, 3, 1, 1),
            _res(32),
            _res(32),
            ConvUnit(32, 64, 3, (3, 1), 1),
            _res(64),
            _res(64),
            ConvUnit(64, 128, 3, 3, 1),
            _res(128),
            _res(128),
            ConvUnit(128, 256, 3, (3, 2), 1),
            _res(256),
            ConvUnit(256, 512, 3, 1, 0),
            ConvUnit(512, 512, 1, 1, 0),
        )

        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(512, 512, 1, 1, 0)),  # 1x1
                nn.Sequential(ConvTransposeUnit(1024, 512, 3, 1, 0), _res(512)),  # 3x3
                nn.Sequential(ConvTransposeUnit(1024, 512, 3, 2, 1, 1), _res(512), _res(512)),  # 6x6
                nn.Sequential(ConvTransposeUnit(768, 384, 3, 2, 1, 1), _res(384), _res(384)),  # 12x12
                nn.Sequential(ConvTransposeUnit(512, 256, 3, 2, 1, 1), _res(256), _res(256)),  # 24x24
                nn.Sequential(ConvTransposeUnit(320, 128, 3, 2, 1, 1), _res(128), _res(128)),  # 48x48
                nn.Sequential(ConvTransposeUnit(160, 64, 3, 2, 1, 1), _res(64), _res(64)),  # 96x96
            ]
        )

        self.output_block = nn.Sequential(
            ConvUnit(80, 32, 3, 1, 1),
            nn.Conv2d(32, 3, kernel_size=1, stride=1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, mel: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 4 or tuple(mel.shape[1:]) != (1, MEL_BINS, MEL_STEPS):
            raise ValueError(f"mel must be (B, 1, {MEL_BINS}, {MEL_STEPS}), got {tuple(mel.shape)}")
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (6, FACE_SIZE, FACE_SIZE):
            raise ValueError(f"faces must be (B, 6, {FACE_SIZE}, {FACE_SIZE}), got {tuple(faces.shape)}")
        if mel.shape[0] != faces.shape[0]:
            raise ValueError(f"batch sizes differ: mel {mel.shape[0]}, faces {faces.shape[0]}")

        x = self.audio_encoder(mel)  # (B, 512, 1, 1)

        feats: list[torch.Tensor] = []
        f = faces
        for block in self.face_encoder_blocks:
            f = block(f)
            feats.append(f)

        for block in self.face_decoder_blocks:
            x = block(x)
            skip = feats.pop()
            if skip.dtype != x.dtype:  # can differ under autocast; keep cat well-defined
                skip = skip.to(x.dtype)
            # Order matters for the checkpoint: decoder output first, encoder skip second.
            x = torch.cat((x, skip), dim=1)

        return self.output_block(x)
