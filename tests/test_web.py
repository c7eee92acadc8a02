"""The web console over HTTP: the real app on 127.0.0.1 (uvicorn), real uploads, the real store."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from heygem_daemon.intake.pairing import FileInfo, Rejection, plan_folder
from heygem_daemon.ops.cleanup import SWEEPS, Cleanup
from heygem_daemon.state import Store
from heygem_daemon.state.tasks import NewTask
from heygem_daemon.web.uploads import UPLOADS_DIR
from media_factory import truncate, write_speech_wav
from s3_server import credentials_env
from web_rig import PASSWORDS, WebServer, console_config, serving, web_settings


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("web")
    console_config(base, max_upload_mb=1, login_attempts=3, login_delay_seconds=60)
    return base


@pytest.fixture(scope="module")
def web(base):
    yield from serving(base / "config.yaml")


@pytest.fixture(scope="module")
def alice(web):
    return web.client("alice")


def audit(web) -> list[dict]:
    return [json.loads(line) for line in (web.cfg.folder("logs") / "audit.log").read_text().splitlines()]


def uploads_root(web) -> Path:
    return web.cfg.folder("work") / UPLOADS_DIR


def open_patch(web, client, location: str, offset: int, length: int, first: bytes) -> socket.socket:
    """A PATCH of `length` bytes whose socket has sent only `first`: left open, it is a client that vanished."""
    sock = socket.create_connection(("127.0.0.1", web.port))
    head = (f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"X-CSRF-Token: {client.csrf}\r\nCookie: heygem_session={client.http.cookies['heygem_session']}\r\n"
            f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n")
    sock.sendall(head.encode() + first)
    return sock


def wait_offset(client, location: str, offset: int) -> None:
    deadline = time.monotonic() + 10
    while int(client.head(location).headers["Upload-Offset"]) < offset:
        assert time.monotonic() < deadline, "the server never wrote what was sent"
        time.sleep(0.05)


def test_a_cut_patch_is_resumed_from_the_servers_offset_and_the_bytes_arrive_identical(web, alice):
    data = os.urandom(600_000)
    location = alice.create("voice.wav", len(data)).headers["Location"]
    # A connection that dies half-way through its PATCH: the server keeps what arrived.
    with open_patch(web, alice, location, 0, len(data), data[:250_000]):
        time.sleep(0.3)
    wait_offset(alice, location, 250_000)
    offset = int(alice.head(location).headers["Upload-Offset"])
    assert offset == 250_000
    done = alice.patch(location, offset, data[offset:])
    assert done.status_code == 204 and done.headers["Upload-Offset"] == str(len(data))
    assert (uploads_root(web) / location.rsplit("/", 1)[1] / "data").read_bytes() == data


def test_a_new_patch_from_the_owner_takes_over_an_upload_whose_client_vanished_with_its_socket_open(web, alice):
    data = os.urandom(600_000)
    location = alice.create("voice.wav", len(data)).headers["Location"]
    with open_patch(web, alice, location, 0, len(data), data[:250_000]) as stale:
        wait_offset(alice, location, 250_000)
        done = alice.patch(location, 250_000, data[250_000:])  # at once, not after a timeout: no 423
        assert done.status_code == 204 and done.headers["Upload-Offset"] == str(len(data))
        stale.settimeout(10)
        told = stale.recv(4096)
    assert told.startswith(b"HTTP/1.1 409") and b"took this upload over" in told
    assert (uploads_root(web) / location.rsplit("/", 1)[1] / "data").read_bytes() == data


def test_a_patch_body_idle_past_upload_idle_seconds_is_ended_and_its_bytes_kept(web, alice, monkeypatch):
    uploads = web.server.config.app.state.console.uploads
    monkeypatch.setattr(uploads, "cfg", uploads.cfg.model_copy(update={
        "web": uploads.cfg.web.model_copy(update={"upload_idle_seconds": 0.5})}))
    location = alice.create("voice.wav", 1000).headers["Location"]
    with open_patch(web, alice, location, 0, 1000, b"a" * 300) as stale:
        stale.settimeout(10)
        told = stale.recv(4096)
        assert stale.recv(4096) == b""  # and the connection closed
    assert told.startswith(b"HTTP/1.1 408") and b"no bytes for 0.5 s" in told
    assert alice.head(location).headers["Upload-Offset"] == "300"
    assert alice.http.delete(web.url + location, headers=alice.headers()).status_code == 204


def test_a_patch_at_another_offset_than_the_servers_is_refused_with_409(alice):
    location = alice.create("voice.wav", 1000).headers["Location"]
    assert alice.patch(location, 0, b"x" * 400).status_code == 204
    wrong = alice.patch(location, 0, b"y" * 600)
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == "400"


def test_options_announce_tus_1_0_with_creation_termination_expiration(web, alice):
    answer = alice.http.options(web.url + "/tus/")
    assert answer.status_code == 204 and answer.headers["Tus-Version"] == "1.0.0"
    assert set(answer.headers["Tus-Extension"].split(",")) == {"creation", "termination", "expiration"}


def test_a_wrong_password_is_refused_and_repeated_failures_are_rate_limited(web):
    client = web.client(None, source="127.0.0.7")
    assert client.login("carol", "wrong").status_code == 401
    assert client.login("nobody", PASSWORDS["carol"]).status_code == 401
    client.login("carol", "wrong")
    slowed = client.login("carol", PASSWORDS["carol"])  # even the right password, for a while
    assert slowed.status_code == 429 and int(slowed.headers["Retry-After"]) > 0
    assert client.get("/jobs", headers={"Accept": "text/html"}).url.endswith("/login")


def test_a_state_changing_request_without_the_csrf_token_is_refused(web, alice):
    bare = alice.http.post(web.url + "/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10"})
    assert bare.status_code == 403 and "CSRF" in bare.json()["reason"]
    form = alice.http.post(web.url + "/jobs/anything/cancel", data={"csrf": "not-the-token"})
    assert form.status_code == 403


def test_another_users_upload_id_is_not_found(web, alice):
    location = alice.create("voice.wav", 100).headers["Location"]
    bob = web.client("bob")
    bob.get("/upload")
    assert bob.head(location).status_code == 404
    assert bob.patch(location, 0, b"z" * 100).status_code == 404
    assert bob.http.delete(web.url + location, headers=bob.headers()).status_code == 404
    assert alice.head(location).headers["Upload-Offset"] == "0"


@pytest.mark.parametrize("name", ["../evil.wav", "/etc/evil.wav", "sub/evil.wav", "bad\x07name.wav", ".."])
def test_a_name_that_is_a_path_or_holds_control_characters_is_refused(web, alice, name):
    answer = alice.create(name, 100)
    assert answer.status_code == 400 and answer.json()["hint"]
    assert not (web.cfg.folder("work") / "evil.wav").exists()


def test_a_file_over_the_size_limit_or_of_another_type_is_refused_at_creation(alice):
    too_big = alice.create("long.wav", 2 * 2**20)
    assert too_big.status_code == 413 and "web.max_upload_mb" in too_big.json()["hint"]
    assert alice.create("notes.docx", 100).status_code == 415


def test_an_incomplete_upload_left_past_its_expiry_is_swept_by_the_cleanup(web, alice):
    location = alice.create("voice.wav", 1000).headers["Location"]
    alice.patch(location, 0, b"a" * 10)
    folder = uploads_root(web) / location.rsplit("/", 1)[1]
    old = time.time() - web.cfg.web.upload_expiry_hours * 3600 - 60
    os.utime(folder / "data", (old, old))
    assert alice.head(location).status_code == 404  # expired is gone for the client at once
    sweep = Cleanup(web.cfg, Store(web.cfg.folder("state") / "heygem.db")).run(
        next(s for s in SWEEPS if s.name == "web_uploads"))
    assert str(folder) in sweep.removed and not folder.exists()


def test_every_page_sends_a_csp_without_inline_scripts_that_forbids_framing(alice):
    for path in ("/jobs", "/upload", "/health", "/login"):
        csp = alice.get(path).headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_a_finished_pair_becomes_a_ready_job_folder_and_an_audit_line(web, alice, tmp_path, portrait_jpg):
    voice = write_speech_wav(tmp_path / "hello.wav", 1.0)
    ids = [alice.upload(voice), alice.upload(portrait_jpg)]
    answer = alice.submit(ids, name="web job", engine="preview", preset="480p", priority="high", upload=False)
    assert answer.status_code == 200, answer.text
    folder = web.cfg.folder("inbox") / answer.json()["job"]
    assert sorted(p.name for p in folder.iterdir()) == [".ready", "hello.wav", "job.yaml", "portrait.jpg"]
    assert yaml.safe_load((folder / "job.yaml").read_text()) == {
        "name": "web job", "engine": "preview", "preset": "480p", "priority": "high", "upload": False}
    assert (folder / "hello.wav").read_bytes() == voice.read_bytes()
    audit = [json.loads(line) for line in (web.cfg.folder("logs") / "audit.log").read_text().splitlines()]
    assert {"event": "web upload", "user": "alice", "job": "web job", "files": 2}.items() <= audit[-1].items()


def test_a_set_naming_one_upload_twice_is_refused_and_its_upload_stays(web, alice, tmp_path):
    voice_id = alice.upload(write_speech_wav(tmp_path / "twice.wav", 1.0))
    answer = alice.submit([voice_id, voice_id], name="twice", engine="preview", preset="480p")
    assert answer.status_code == 422 and answer.json()["reason"] == "the same upload is listed twice"
    assert alice.head(f"/tus/{voice_id}").status_code == 200
    assert not (web.cfg.folder("inbox") / "twice").exists()


def test_two_submits_of_one_set_at_once_make_one_job_and_a_reasoned_refusal_and_leave_no_staging(
        web, alice, tmp_path, portrait_jpg):
    ids = [alice.upload(write_speech_wav(tmp_path / "double.wav", 1.0)), alice.upload(portrait_jpg)]
    answers: list = []
    clicks = [threading.Thread(target=lambda: answers.append(
        alice.submit(ids, name="double click", engine="preview", preset="480p"))) for _ in range(2)]
    for click in clicks:
        click.start()
    for click in clicks:
        click.join()
    assert sorted(a.status_code for a in answers) == [200, 422]
    refused = next(a for a in answers if a.status_code == 422).json()
    assert "sent already" in refused["reason"] and refused["hint"]
    folder = web.cfg.folder("inbox") / "double click"
    assert sorted(p.name for p in folder.iterdir()) == [".ready", "double.wav", "job.yaml", "portrait.jpg"]
    assert not [p for p in uploads_root(web).iterdir() if p.name.startswith(".set-")]


def test_a_script_and_a_photo_from_the_web_become_a_ready_job_folder(web, alice, tmp_path, portrait_jpg):
    script = tmp_path / "welcome.txt"
    script.write_bytes("欢迎加入我们的团队！".encode("gb18030"))
    answer = alice.submit([alice.upload(script), alice.upload(portrait_jpg)], name="script job", engine="preview",
                          preset="480p")
    assert answer.status_code == 200, answer.text
    folder = web.cfg.folder("inbox") / answer.json()["job"]
    assert (folder / "welcome.txt").read_bytes() == script.read_bytes()


def test_a_set_intake_would_refuse_is_refused_with_reason_and_hint_and_nothing_moves(web, alice, tmp_path,
                                                                                     portrait_jpg):
    cut = truncate(write_speech_wav(tmp_path / "cut.wav", 2.0), 0.5)
    ids = [alice.upload(cut), alice.upload(portrait_jpg)]
    answer = alice.submit(ids, name="cut job", engine="preview", preset="480p")
    assert answer.status_code == 422 and "cut short" in answer.json()["reason"] and answer.json()["hint"]
    assert not (web.cfg.folder("inbox") / "cut job").exists()


def intake_says(folder: str, files: list[str]) -> dict[str, str]:
    """What intake answers for a hand-over folder holding these files (job.yaml lists no pairs)."""
    outcome = plan_folder(folder, [FileInfo(f"{folder}/{n}", 10, 0, stat.S_IFREG | 0o644) for n in files],
                          b"engine: preview\npreset: 480p\n", True, {"preview"}, {"480p"})
    assert isinstance(outcome, Rejection)
    return {"reason": outcome.problems[0].reason, "hint": outcome.problems[0].hint}


@pytest.mark.parametrize("names", [
    ["hello.wav", "anna.jpg", "Anna.png"],  # one audio, two portraits whose videos would both be "anna"
    ["anna.jpg", "ben.png"],  # no audio
])
def test_a_set_intakes_pairing_would_refuse_is_refused_in_intakes_words_and_nothing_moves(
        web, alice, tmp_path, portrait_jpg, names):
    voice = write_speech_wav(tmp_path / "hello.wav", 1.0)
    ids = [alice.upload(voice if n.endswith(".wav") else portrait_jpg, n) for n in names]
    answer = alice.submit(ids, name="unpaired", engine="preview", preset="480p")
    assert answer.status_code == 422 and answer.json() == intake_says("unpaired", names)
    assert not (web.cfg.folder("inbox") / "unpaired").exists()


def test_a_local_video_is_served_with_http_range(web, alice):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("ranged", {})
    folder = web.cfg.folder("outputs") / job.name
    folder.mkdir(parents=True)
    (folder / "clip.mp4").write_bytes(bytes(range(256)) * 40)
    part = alice.get(f"/jobs/{job.name}/files/clip.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == (bytes(range(256)) * 40)[100:200]
    assert alice.get(f"/jobs/{job.name}/files/..%2Fclip.mp4").status_code == 404


def test_the_jobs_page_lists_newest_first_filters_by_state_and_pages(web, alice):
    store = Store(web.cfg.folder("state") / "heygem.db")
    for i in range(60):
        job = store.jobs.create(f"paged-{i:03d}", {})
        if i % 2:
            store.jobs.set_state(job.id, "failed", error={"reason": "r", "hint": "h"})
    first = alice.get("/jobs?q=paged-&state=failed").text
    assert ">30 job(s)</p>" in first and "paged-059" in first and "paged-058" not in first
    second = alice.get("/jobs?q=paged-&page=2").text
    assert "60 job(s), page 2 of 2" in second and "paged-009" in second and "paged-059" not in second


def test_a_delivered_job_plays_from_its_links_with_copy_buttons_and_links_json(web, alice):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("delivered", {})
    store.jobs.queue(job.id, [NewTask("anna", "/in/a.wav", "/in/a.jpg",
                                      str(web.cfg.folder("outputs") / "delivered" / "anna.mp4"))])
    folder = web.cfg.folder("outputs") / "delivered"
    folder.mkdir(parents=True)
    link = "https://bucket.example.com/k/anna.mp4?X-Amz-Signature=abc"
    zip_link = "https://bucket.example.com/k/delivered.zip?X-Amz-Signature=def"
    (folder / "links.json").write_text(json.dumps({"job": "delivered", "files": [
        {"file": "anna.mp4", "size": 10, "path": None, "link": link, "expires_at": "2026-12-01T00:00:00Z"}],
        "zip": {"file": "delivered.zip", "size": 20, "path": None, "link": zip_link,
                "expires_at": "2026-12-01T00:00:00Z"}}))
    page = alice.get("/jobs/delivered").text.replace("&amp;", "&")
    assert f'<video controls preload="metadata" src="{link}">' in page
    assert f'data-copy="{link}"' in page and f'data-copy="{zip_link}"' in page
    assert f'<a href="{zip_link}" download>delivered.zip</a>' in page  # the zip opens from the page too
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1796083200))  # 2026-12-01T00:00:00Z, as on every time
    assert page.count(f"valid until {local}") == 2 and "2026-12-01T00:00:00Z" not in page
    download = alice.get("/jobs/delivered/files/links.json")
    assert download.json()["zip"]["link"] == zip_link and "attachment" in download.headers["Content-Disposition"]


def test_web_refuses_to_start_while_off_and_hash_password_reads_stdin(tmp_path, monkeypatch, capsys):
    from heygem_daemon.cli import EXIT_CONFIG, main
    from heygem_daemon.web.auth import check_password

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"base_dir": str(tmp_path)}))
    assert main(["-c", str(tmp_path / "config.yaml"), "web"]) == EXIT_CONFIG
    assert "web.enabled: true" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret words\n"))
    assert main(["web", "hash-password"]) == 0
    hashed = capsys.readouterr().out.strip()
    assert hashed.startswith("$argon2") and check_password({"x": hashed}, "x", "s3cret words")


def test_cancel_from_the_job_page_is_the_clis_request_with_an_audit_line(web):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("to cancel", {})
    store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", "/out/to cancel/a.mp4")])
    carol = web.client("carol")  # an admin: this job came through the inbox, no web user owns it
    page = carol.get("/jobs/to cancel").text
    assert 'action="/jobs/to%20cancel/cancel"' in page
    answer = carol.http.post(web.url + "/jobs/to%20cancel/cancel", data={"csrf": carol.csrf})
    assert answer.status_code == 200 and "cancelling" in answer.text  # the request's own sentence
    assert store.jobs.get(job.id).state == "cancelling"
    assert {"event": "web cancel", "user": "carol", "job": "to cancel", "admin": True}.items() <= audit(web)[-1].items()


def test_the_job_page_says_what_a_waiting_job_waits_for_and_since_when(web, alice):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("waits", {"priority": "high"})  # its task is the one taken next
    store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", "/out/waits/a.mp4")])
    task, since = store.tasks.take_next("cpu"), time.time() - 60
    store.tasks.wait(task.id, {"kind": "outage", "reason": "unreachable", "since": since,
                               "dependency": "heygem service http://gpu1:8383"}, since + 600)
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    assert f"Waiting for heygem service http://gpu1:8383 since {shown}" in alice.get("/jobs/waits").text


def test_each_upload_holds_its_length_against_the_disk_guard_from_creation_and_every_patch_checks_it(
        web, alice, monkeypatch):
    uploads = web.server.config.app.state.console.uploads
    mb = 2**20

    def guard_leaving(room: int) -> None:
        """The disk guard set so that `room` bytes more fit beside what other uploads hold."""
        free = shutil.disk_usage(uploads.root).free - uploads.reserved()
        monkeypatch.setattr(uploads, "cfg", web.cfg.model_copy(update={
            "web": web.cfg.web.model_copy(update={"max_upload_mb": 1000}),
            "disk_guard": web.cfg.disk_guard.model_copy(update={"min_free_gb": (free - room) / 2**30})}))
    guard_leaving(300 * mb)  # room for one 200 MB upload, not two (100 MB either side for the disk's drift)
    first = alice.create("first.wav", 200 * mb)
    assert first.status_code == 201
    second = alice.create("second.wav", 200 * mb)  # nothing written yet: the first one's 200 MB are held
    assert second.status_code == 507 and "uploads in progress hold 0.2" in second.json()["reason"]
    guard_leaving(-100 * mb)  # the disk filled since: the first upload's PATCH is refused before any byte lands
    location = first.headers["Location"]
    patch = alice.patch(location, 0, b"x" * 1000)
    assert patch.status_code == 507 and "disk_guard.min_free_gb" in patch.json()["reason"]
    assert alice.head(location).headers["Upload-Offset"] == "0"


def test_a_patch_the_disk_cannot_take_is_refused_with_the_systems_reason(web, alice, monkeypatch):
    uploads = web.server.config.app.state.console.uploads
    location = alice.create("voice.wav", 1000).headers["Location"]
    data = uploads_root(web) / location.rsplit("/", 1)[1] / "data"
    data.unlink()
    data.symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    monkeypatch.setattr(uploads, "cfg", uploads.cfg.model_copy(update={  # /dev/full was last touched at boot
        "web": uploads.cfg.web.model_copy(update={"upload_expiry_hours": 10**6})}))
    answer = alice.patch(location, 0, b"x" * 1000)
    assert answer.status_code == 507 and "No space left on device" in answer.json()["reason"]
    assert alice.http.delete(web.url + location, headers=alice.headers()).status_code == 204


def test_the_live_job_fragment_keeps_the_pages_csrf_token_for_its_forms(web, alice):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("live one", {})
    store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", "/out/live one/a.mp4")])
    alice.get("/jobs/live one")
    with alice.http.get(web.url + "/jobs/live%20one/live", stream=True, timeout=30) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        first = b""
        for chunk in events.iter_content(None):
            first += chunk
            if b"\n\n" in first:
                break
    assert b'action="/jobs/live%20one/cancel"' in first and f'value="{alice.csrf}"'.encode() in first


def test_behind_a_proxy_its_user_header_logs_in_and_is_only_trusted_on_the_loopback(tmp_path):
    from heygem_daemon.config import ConfigError, load_config

    settings = {"base_dir": str(tmp_path), "web": {"enabled": True, "auth": "proxy"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    server = WebServer(tmp_path / "config.yaml").start()
    try:
        client = server.client(None)
        nobody = client.get("/jobs", headers={"Accept": "text/html"})
        assert nobody.status_code == 401 and "named no user (header X-Remote-User)" in nobody.text
        page = client.get("/jobs", headers={"X-Remote-User": "dora"})
        assert page.status_code == 200 and '<span class="who">dora' in page.text and "Log out" not in page.text
    finally:
        server.stop()
    settings["web"]["host"] = "0.0.0.0"
    (tmp_path / "open.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match="host must be 127.0.0.1"):
        load_config(tmp_path / "open.yaml")


@pytest.mark.parametrize("setting, proxies, forwarded_proto, secure", [
    ("auto", [], None, False),                  # plain HTTP: a Secure cookie would never come back
    ("auto", ["127.0.0.1"], "https", True),     # TLS ends at the trusted proxy on this host, which says so
    ("auto", [], "https", False),               # anyone can send the header: not believed from an untrusted peer
    (True, [], None, True),                     # TLS ends at a proxy the console does not trust: the operator says so
    (False, ["127.0.0.1"], "https", False),
])
def test_the_session_cookie_is_secure_when_the_console_is_reached_over_https(tmp_path, setting, proxies,
                                                                              forwarded_proto, secure):
    settings = {"base_dir": str(tmp_path), "logging": {"console": False},
                **web_settings(secure_cookies=setting, trusted_proxies=proxies)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    server = WebServer(tmp_path / "config.yaml").start()
    try:
        headers = {"X-Forwarded-Proto": forwarded_proto} if forwarded_proto else {}
        login = server.client(None).http.get(server.url + "/login", headers=headers, timeout=30)
    finally:
        server.stop()
    flags = [f.strip().lower() for f in login.headers["set-cookie"].split(";")]
    assert flags[0].startswith("heygem_session=") and "httponly" in flags and "samesite=strict" in flags
    assert ("secure" in flags) is secure


def test_the_health_page_shows_a_heartbeat_older_than_three_beats_as_a_stuck_main_loop(web, alice):
    from heygem_daemon.fs.ops import atomic_write_json
    from heygem_daemon.ops.daemon_state import LOCK_FILE, STALE_SECONDS, STATE_FILE

    state = web.cfg.folder("state")
    with open(state / LOCK_FILE, "w") as lock:  # this process plays the daemon: it holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(str(os.getpid()))
        lock.flush()
        atomic_write_json(state / STATE_FILE, {"pid": os.getpid(), "updated": time.time() - STALE_SECONDS - 30})
        page = alice.get("/health").text
    assert f"running as pid {os.getpid()} since" in page
    assert f"none for over {STALE_SECONDS:.0f} s, so its main loop is stuck" in page


HEALTH_WITH_WAV2LIP = """
import json, sys
from pathlib import Path
import yaml
from web_rig import WebServer, web_settings
base = Path(sys.argv[1])
settings = {"base_dir": str(base), "logging": {"console": False}, "engine": {"name": "wav2lip"},
            "engines": {"wav2lip": {"checkpoint": str(base / "wav2lip_gan.pth")}}, **web_settings()}
(base / "config.yaml").write_text(yaml.safe_dump(settings))
server = WebServer(base / "config.yaml").start()
alice = server.client("alice")
viewed = alice.get("/health").text
checked = alice.http.post(server.url + "/health/checks", data={"csrf": alice.csrf}, timeout=300).text
server.stop()
print(json.dumps({"torch": "torch" in sys.modules, "viewed": viewed, "checked": checked}))
"""


def test_with_wav2lip_configured_the_health_page_and_its_checks_never_import_torch_in_the_web_process(tmp_path):
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    done = subprocess.run([sys.executable, "-c", HEALTH_WITH_WAV2LIP, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] is False
    assert "Run the checks" in seen["viewed"] and 'class="doctor"' not in seen["viewed"]
    assert "wav2lip checkpoint" in seen["checked"]  # the engine's own checks ran, in the doctor's process


@pytest.fixture
def s3_web(tmp_path, moto_server, monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    bucket = moto_server.new_bucket()
    settings = {"base_dir": str(tmp_path), "logging": {"console": False},
                "s3": moto_server.s3_settings(bucket), **web_settings()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    server = WebServer(tmp_path / "config.yaml").start()
    yield server, lambda: moto_server.log_path.read_text().count(f'"HEAD /{bucket} ')
    server.stop()


def test_viewing_the_health_page_asks_no_service_and_the_checks_run_once_a_minute_at_most(s3_web):
    server, bucket_asked = s3_web
    alice, bob = server.client("alice"), server.client("bob")
    for _ in range(3):
        assert alice.get("/health").status_code == 200
    assert bucket_asked() == 0

    def check(client) -> str:
        return client.http.post(server.url + "/health/checks", data={"csrf": client.csrf}, timeout=300).text
    pages: list[str] = []
    together = [threading.Thread(target=lambda c=c: pages.append(check(c))) for c in (alice, bob)]
    for t in together:
        t.start()
    for t in together:
        t.join()
    pages.append(check(alice))
    assert sum("Checked just now." in page for page in pages) == 1
    assert all("reachable with the configured credentials" in page or "running already" in page for page in pages)
    deadline = time.monotonic() + 5  # moto writes its log line once the answer is sent
    while bucket_asked() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bucket_asked() == 1


def test_the_job_page_shows_its_webhook_deliveries_and_what_a_refusing_receiver_said(web, alice):
    from heygem_daemon.state import NewNotification

    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("hooked", {})
    store.outbox.add([NewNotification(f"webhook:{e}:{job.id}:1", "webhook:shop", "webhook", job.id, e, "{}", "json",
                                      "info") for e in ("video.done", "job.done")])
    sent, refused = store.outbox.select(job.id)
    store.outbox.sent(sent.id)
    store.outbox.failed(refused.id, "refused by webhook: http://erp answered HTTP 410: gone", None)
    page = alice.get("/jobs/hooked").text
    assert "Webhooks (2)" in page and "<td>video.done</td><td>shop</td><td>sent</td>" in page
    assert "<td>job.done</td><td>shop</td><td>gave_up</td>" in page and "answered HTTP 410: gone" in page
