"""Shared fixtures. Media fixtures come first; add others below."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import daemon_harness
from media_factory import FIXTURES, PORTRAIT_JPG, write_speech_wav


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures (a module's daemon fixture included) are set up: only a test marked `daemon`
    may start the real daemon (daemon_harness.require_daemon_marker)."""
    daemon_harness.may_start_daemon = item.get_closest_marker("daemon") is not None


@pytest.fixture
def portrait_jpg() -> Path:
    """NASA astronaut portrait, 320x320; OpenCV finds the face at (109, 40, 62, 62)."""
    return PORTRAIT_JPG


@pytest.fixture
def no_face_jpg() -> Path:
    return FIXTURES / "no_face.jpg"


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> Path:
    """One second of speech-like audio, shared by a module's tests."""
    return write_speech_wav(tmp_path_factory.mktemp("media") / "voice.wav", 1.0)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """One real moto S3 server process for the session; tests take their own bucket (server.new_bucket())."""
    from s3_server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nanio_server(tmp_path_factory):
    """One real nanio S3 server for the session: it checks signatures, keys, link expiry and clock skew."""
    from s3_server import NanioServer

    pytest.importorskip("nanio", reason="nanio needs Python 3.11+")
    server = NanioServer(tmp_path_factory.mktemp("nanio") / "nanio.log").start()
    yield server
    server.stop()
@pytest.fixture
def scratch():
    """A scratch folder every user can reach (pytest's own tmp folders are private to root), for tests
    that act as an unprivileged user."""
    import shutil

    from intake_rig import world_dir

    path = world_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmpfs(scratch):
    """A small real filesystem for work/, so that claims cross filesystems and can run out of room."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = scratch / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
