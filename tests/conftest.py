"""Shared fixtures. Media fixtures come first; add others below."""

from __future__ import annotations

from pathlib import Path

import pytest

from media_factory import FIXTURES, PORTRAIT_JPG


@pytest.fixture
def portrait_jpg() -> Path:
    """NASA astronaut portrait, 320x320; OpenCV finds the face at (109, 40, 62, 62)."""
    return PORTRAIT_JPG


@pytest.fixture
def no_face_jpg() -> Path:
    return FIXTURES / "no_face.jpg"
