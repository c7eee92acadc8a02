"""Intake keeps serving everyone when one entry is unreadable, unmovable or too big for the disk;
in-process with a clock the test moves, as an unprivileged daemon user where permissions matter."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest

from heygem_daemon.fs.ops import move
from heygem_daemon.intake.claim import recover_detected
from intake_rig import DAEMON_USER, OTHER_USER, IntakeRig, acting_as, chown_tree, system_user
from media_factory import PORTRAIT_JPG, write_speech_wav


def drop_pair(inbox: Path, stem: str, voice: Path, folder: str | None = None) -> None:
    where = inbox / folder if folder else inbox
    where.mkdir(exist_ok=True)
    shutil.copy(voice, where / f"{stem}.wav")
    shutil.copy(PORTRAIT_JPG, where / f"{stem}.jpg")


@pytest.fixture
def voice(scratch, voice):
    """The shared voice, copied where an unprivileged user can read it."""
    return Path(shutil.copy(voice, scratch / "voice.wav"))


def waits_whole(rig: IntakeRig, work: Path, stem: str) -> dict:
    """Run intake for a minute; the loose pair `stem` must still be whole in the inbox, nothing claimed or
    left on work/, and one outage warning said why. Returns that warning."""
    try:
        rig.settle()
        rig.settle(60)
    finally:
        rig.close()
    assert rig.jobs() == []
    assert sorted(p.name for p in rig.inbox.iterdir()) == [f"{stem}.jpg", f"{stem}.wav"]
    assert list(work.iterdir()) == []
    [warning] = [r for r in rig.log_lines("warning") if r.get("group") == f"f:{stem}"]
    assert warning["kind"] == "outage"
    return warning


def test_an_unreadable_inbox_folder_is_skipped_with_one_warning_and_the_others_are_served(scratch, voice):
    daemon = system_user(DAEMON_USER)
    rig = IntakeRig(scratch)
    chown_tree(scratch, daemon)
    with acting_as(daemon):
        locked = rig.inbox / "locked"
        locked.mkdir()
        (locked / "a.wav").write_bytes(b"RIFF")
        locked.chmod(0)
        drop_pair(rig.inbox, "alice", voice)
        try:
            for _ in range(4):
                rig.settle(60)
        finally:
            locked.chmod(0o755)
            rig.close()
    assert [(j.name, j.state) for j in rig.jobs()] == [("alice", "queued")]
    warnings = [r for r in rig.log_lines("warning") if r.get("entry") == "locked"]
    assert len(warnings) == 1 and "Permission denied" in warnings[0]["error"] and "chmod" in warnings[0]["hint"]


def test_an_exception_in_an_intake_step_is_logged_and_the_thread_carries_on(scratch, voice):
    rig = IntakeRig(scratch)
    real_step, calls = rig.intake.step, []

    def failing_once() -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault in one intake step")
        return real_step()

    rig.intake.step = failing_once  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=rig.intake.run, args=(stop,), daemon=True)
    try:
        thread.start()
        for _ in range(1000):
            if len(calls) >= 2:
                break
            rig.intake.wake.set()  # cut the pause after the error short
            stop.wait(0.01)
        assert thread.is_alive() and len(calls) >= 2
    finally:
        stop.set()
        rig.intake.wake.set()
        thread.join(10)
        rig.close()
    errors = rig.log_lines("error")
    assert len(errors) == 1 and "injected fault" in errors[0]["exception"]
    assert errors[0]["event"] == "intake step failed; carrying on"


def test_a_folder_the_daemon_cannot_move_waits_with_one_warning_and_leaves_no_rows_or_folders(scratch, voice):
    daemon, other = system_user(DAEMON_USER), system_user(OTHER_USER)
    rig = IntakeRig(scratch)
    chown_tree(scratch, daemon)
    rig.inbox.chmod(0o777)  # a shared drop folder: everyone may put things in
    with acting_as(other):
        drop_pair(rig.inbox, "pf", voice, folder="pf")  # readable by all, writable by its owner only
    try:
        with acting_as(daemon):
            for _ in range(13):  # a minute of 5 s steps: the old code made pf, pf-2 ... pf-13
                rig.settle(5)
            assert rig.jobs() == []
            assert list(rig.cfg.folder("work").iterdir()) == []
            assert sorted(p.name for p in (rig.inbox / "pf").iterdir()) == ["pf.jpg", "pf.wav"]
        with acting_as(other):
            (rig.inbox / "pf").chmod(0o777)  # what the warning's hint asks for
        with acting_as(daemon):
            rig.settle(300)  # the backoff's longest wait
    finally:
        rig.close()
    assert [(j.name, j.state) for j in rig.jobs()] == [("pf", "queued")]
    warnings = [r for r in rig.log_lines("warning") if r.get("group") == "d:pf"]
    assert len(warnings) == 1
    assert "pf" in warnings[0]["reason"] and "chmod" in warnings[0]["hint"] and warnings[0]["kind"] == "setup"
    assert rig.log_lines("error") == []


def test_a_job_bigger_than_the_free_space_on_work_waits_whole_in_the_inbox_and_the_operator_is_told(scratch, tmpfs):
    work = tmpfs("work", "size=2m")
    rig = IntakeRig(scratch, f"folders: {{work: {work}}}\n")
    write_speech_wav(rig.inbox / "big.wav", 100.0)  # 3.2 MB: more than work/ holds
    shutil.copy(PORTRAIT_JPG, rig.inbox / "big.jpg")
    warning = waits_whole(rig, work, "big")
    assert "GB free" in warning["reason"]
    [(key, text)] = rig.alerts  # an outage: the operator hears of it once, nothing is failed
    assert key == "intake-disk-full" and "work/ has" in text


def test_a_claim_that_runs_out_of_room_halfway_puts_the_pair_back_together(scratch, tmpfs, voice):
    work = tmpfs("work", "size=10m,nr_inodes=4")  # room for bytes, not for the second file of the pair
    rig = IntakeRig(scratch, f"folders: {{work: {work}}}\n")
    drop_pair(rig.inbox, "half", voice)
    warning = waits_whole(rig, work, "half")
    assert "No space left" in warning["reason"]


def fill(disk: Path) -> None:
    """Take every free byte of a filesystem."""
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free)


def test_a_duplicate_drop_is_archived_while_work_is_full(scratch, tmpfs, voice):
    work = tmpfs("work", "size=1m")
    rig = IntakeRig(scratch, f"folders: {{work: {work}}}\n")
    try:
        drop_pair(rig.inbox, "first", voice)
        rig.settle()
        rig.settle()
        fill(work)
        drop_pair(rig.inbox, "again", voice)  # the same content: its files go to archive/, which has room
        rig.settle()
        rig.settle()
    finally:
        rig.close()
    assert sorted((j.name, j.state) for j in rig.jobs()) == [("again", "done"), ("first", "queued")]
    [staged] = rig.cfg.folder("archive").glob("*/again")
    assert sorted(p.name for p in staged.iterdir()) == ["again.jpg", "again.wav"]


def test_a_duplicate_drop_bigger_than_the_free_space_on_archive_waits_whole_and_archive_is_named(scratch, tmpfs):
    archive = tmpfs("archive", "size=2m")
    rig = IntakeRig(scratch, f"folders: {{archive: {archive}}}\n")
    big = write_speech_wav(scratch / "big.wav", 100.0)  # 3.2 MB: work/ holds it, archive/ does not
    try:
        drop_pair(rig.inbox, "first", big)
        rig.settle()
        rig.settle()
        drop_pair(rig.inbox, "again", big)
        rig.settle()
        rig.settle(60)
    finally:
        rig.close()
    assert [(j.name, j.state) for j in rig.jobs()] == [("first", "queued")]
    assert sorted(p.name for p in rig.inbox.iterdir()) == ["again.jpg", "again.wav"]
    assert list(archive.iterdir()) == []
    [warning] = [r for r in rig.log_lines("warning") if r.get("group") == "f:again"]
    assert warning["kind"] == "outage" and "archive/ has" in warning["reason"]


def test_a_move_that_fills_the_disk_leaves_no_temp_and_the_source_intact(scratch, tmpfs):
    small = tmpfs("small", "size=1m")
    src = write_speech_wav(scratch / "big.wav", 60.0)
    with pytest.raises(OSError) as failed:
        move(src, small / "big.wav")
    assert failed.value.errno == errno.ENOSPC
    assert list(small.iterdir()) == [] and src.stat().st_size > 1 << 20


def test_a_folder_holding_our_own_cut_short_temp_is_still_taken(scratch, voice):
    rig = IntakeRig(scratch)
    drop_pair(rig.inbox, "again", voice, folder="again")
    (rig.inbox / "again" / ".error.json.0123abcd.tmp").write_text('{"job": ')
    (rig.inbox / "again" / ".ready").touch()
    try:
        rig.settle(0)
    finally:
        rig.close()
    assert [(j.name, j.state) for j in rig.jobs()] == [("again", "queued")]


def test_undoing_a_cut_short_refusal_removes_our_temp_from_the_folder_going_back(scratch, voice):
    rig = IntakeRig(scratch)
    staging = rig.cfg.folder("failed") / "refused"
    drop_pair(staging.parent, "refused", voice, folder="refused")
    (staging / ".error.json.0123abcd.tmp").write_text('{"job": ')
    job = rig.store.jobs.create("refused", {"sources": ["refused"], "folder": True})
    rig.store.jobs.set_state(job.id, "detected", spec={"sources": ["refused"], "folder": True,
                                                        "staging": str(staging)})
    try:
        assert recover_detected(rig.cfg, rig.store) == 1
    finally:
        rig.close()
    assert sorted(p.name for p in (rig.inbox / "refused").iterdir()) == ["refused.jpg", "refused.wav"]


def test_any_thread_that_dies_says_so_in_heygem_log(scratch):
    rig = IntakeRig(scratch)  # sets up logging like the daemon

    def doomed() -> None:
        raise RuntimeError("nobody catches this")

    thread = threading.Thread(target=doomed, name="doomed")
    thread.start()
    thread.join()
    rig.close()
    [line] = rig.log_lines("error")
    assert line["event"] == "a thread died" and line["thread"] == "doomed"
    assert "nobody catches this" in line["exception"]


def test_another_users_loose_pair_in_a_sticky_inbox_waits_and_names_the_owner(scratch, voice):
    daemon, other = system_user(DAEMON_USER), system_user(OTHER_USER)
    rig = IntakeRig(scratch)
    chown_tree(scratch, daemon)
    os.chown(rig.inbox, 0, 0)
    rig.inbox.chmod(0o1777)  # like /tmp, owned by root: anyone may drop, only a file's owner may rename it
    with acting_as(other):
        drop_pair(rig.inbox, "st", voice)
    try:
        with acting_as(daemon):
            for _ in range(3):
                rig.settle(5)
    finally:
        rig.close()
    assert rig.jobs() == [] and list(rig.cfg.folder("work").iterdir()) == []
    [warning] = [r for r in rig.log_lines("warning") if r.get("group") == "f:st"]
    assert "sticky" in warning["reason"] and OTHER_USER in warning["reason"] and DAEMON_USER in warning["reason"]
    # No mode bit lets anyone but an owner rename in a sticky folder: the hint says what does.
    assert f"chown {DAEMON_USER}" in warning["hint"] and "chmod -t" in warning["hint"] and "g+w" not in warning["hint"]


def test_an_unreadable_file_of_a_loose_pair_waits_with_one_warning_and_is_taken_once_readable(scratch, voice):
    daemon = system_user(DAEMON_USER)
    rig = IntakeRig(scratch)
    chown_tree(scratch, daemon)
    try:
        with acting_as(daemon):
            drop_pair(rig.inbox, "shut", voice)
            (rig.inbox / "shut.wav").chmod(0)
            for _ in range(4):
                rig.settle(60)
            assert rig.jobs() == [] and sorted(p.name for p in rig.inbox.iterdir()) == ["shut.jpg", "shut.wav"]
            (rig.inbox / "shut.wav").chmod(0o644)  # what the warning's hint asks for
            rig.settle(0)
            rig.settle(3)
    finally:
        rig.close()
    assert [(j.name, j.state) for j in rig.jobs()] == [("shut", "queued")]
    [warning] = [r for r in rig.log_lines("warning") if r.get("group") == "f:shut"]
    assert "cannot read shut.wav" in warning["reason"] and "chmod a+r" in warning["hint"]
