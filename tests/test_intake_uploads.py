"""Files still arriving are never taken: a writer that pauses keeps its file (inotify's close-write says when
it is done), a file that looks cut short is given time first, and folders holding nothing to do are left
alone. In-process with the real inotify observer and a clock the test moves."""

from __future__ import annotations

import shutil
from pathlib import Path

from intake_rig import IntakeRig
from media_factory import PORTRAIT_JPG, truncate, write_speech_wav
from notify_receiver import wait_until
from smb_server import SmbServer

WATCHER = "watcher: {settle_seconds: 2, pair_timeout: 600, stalled_upload_seconds: 900}\n"


def open_for_writing(rig: IntakeRig, path: Path, now: bool) -> None:
    """Wait until the observer has seen `path` written to and not closed (now=True), or closed (False)."""
    wait_until(lambda: rig.intake.writes.writing(str(path)) == now, 10,
               lambda: f"{path.name} {'open' if now else 'closed'} for writing in the observer's view")


def taken_once_closed(rig: IntakeRig, target: Path) -> None:
    """The writer closed `target`: intake sees the close, then the settle window passes."""
    open_for_writing(rig, target, False)
    rig.settle(0)
    rig.settle(3)


def claimed_bytes(rig: IntakeRig, name: str) -> bytes:
    """What the one queued job holds of the input `name`."""
    [job] = rig.jobs()
    assert job.state == "queued"
    [claimed] = rig.cfg.folder("work").rglob(name)
    return claimed.read_bytes()


def test_a_writer_that_pauses_longer_than_the_settle_window_keeps_its_file_until_it_closes(scratch):
    rig = IntakeRig(scratch, WATCHER)
    rig.watch()
    audio = write_speech_wav(scratch / "voice.wav", 2.0).read_bytes()
    shutil.copy(PORTRAIT_JPG, rig.inbox / "slow.jpg")
    target = rig.inbox / "slow.wav"
    try:
        with open(target, "wb") as fh:  # a client that keeps its handle open, like smbd for an SMB upload
            fh.write(audio[: len(audio) // 2])
            fh.flush()
            open_for_writing(rig, target, True)
            for _ in range(8):  # an 80 s pause: past the settle window and the cut-short grace
                rig.settle(10)
            assert rig.jobs() == [] and target.stat().st_size == len(audio) // 2
            fh.write(audio[len(audio) // 2:])
        taken_once_closed(rig, target)
    finally:
        rig.close()
    assert claimed_bytes(rig, "slow.wav") == audio


def test_an_smb_client_that_pauses_mid_upload_keeps_its_file_until_smbd_closes_it(scratch):
    rig = IntakeRig(scratch, WATCHER)
    server = SmbServer(rig.inbox, scratch / "samba")
    rig.watch()
    audio = write_speech_wav(scratch / "voice.wav", 2.0)
    data = audio.read_bytes()
    shutil.copy(PORTRAIT_JPG, rig.inbox / "smb.jpg")
    target = rig.inbox / "smb.wav"
    upload = None
    try:
        upload = server.upload("smb.wav", audio, len(data) // 2)
        open_for_writing(rig, target, True)
        rig.settle(0)
        for _ in range(8):  # the client pauses for 80 s with its file open on the server
            rig.settle(10)
        assert rig.jobs() == [] and target.stat().st_size == len(data) // 2
        upload.finish()
        taken_once_closed(rig, target)
    finally:
        if upload is not None:
            upload.abandon()
        rig.close()
        server.stop()
    assert claimed_bytes(rig, "smb.wav") == data


def test_a_file_left_open_with_no_new_data_past_the_limit_is_refused_as_a_stalled_upload(scratch):
    rig = IntakeRig(scratch, WATCHER)
    rig.watch()
    shutil.copy(PORTRAIT_JPG, rig.inbox / "gone.jpg")
    target = rig.inbox / "gone.wav"
    try:
        with open(target, "wb") as fh:
            fh.write(write_speech_wav(scratch / "voice.wav", 2.0).read_bytes()[:20000])
            fh.flush()
            open_for_writing(rig, target, True)
            rig.settle(0)
            rig.settle(800)
            assert rig.jobs() == []
            rig.settle(200)
    finally:
        rig.close()
    [job] = rig.jobs()
    assert job.state == "failed"
    record = (rig.cfg.folder("failed") / "gone" / "error.json").read_text()
    assert "upload stalled" in record and "cut short" not in record
    assert (rig.cfg.folder("failed") / "gone" / "gone.wav").is_file()


def test_a_file_that_looks_cut_short_is_waited_on_for_the_grace_window_then_refused(scratch, voice):
    rig = IntakeRig(scratch)
    truncate(Path(shutil.copy(voice, rig.inbox / "cut.wav")), 0.5)
    shutil.copy(PORTRAIT_JPG, rig.inbox / "cut.jpg")
    try:
        rig.settle(0)
        rig.settle(3)  # settled: probed, and it looks cut short
        assert rig.jobs() == [] and (rig.inbox / "cut.wav").exists()
        rig.settle(60)
    finally:
        rig.close()
    [job] = rig.jobs()
    assert job.state == "failed"
    assert "cut short" in (rig.cfg.folder("failed") / "cut" / "error.json").read_text()


def test_empty_and_droppings_only_folders_are_left_alone_and_never_fail(scratch):
    rig = IntakeRig(scratch)
    (rig.inbox / "New folder (2)").mkdir()
    mac = rig.inbox / "from a mac"
    mac.mkdir()
    (mac / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (mac / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    try:
        rig.settle(3)
        rig.settle(700)  # past pair_timeout
    finally:
        rig.close()
    assert rig.jobs() == []
    assert sorted(p.name for p in rig.inbox.iterdir()) == ["New folder (2)", "from a mac"]
    assert list(rig.cfg.folder("failed").iterdir()) == []
