"""The web console as an attacker meets it: sessions that end on the server, login throttling by real
address, bounded memory before login, strict query values, who may act on a job. The real app on
127.0.0.1 (uvicorn), clients from other loopback addresses, the real store."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import yaml

from heygem_daemon.cli import main
from heygem_daemon.config import Web
from heygem_daemon.state import Store
from heygem_daemon.state.tasks import NewTask
from heygem_daemon.web.auth import MAX_USER_CHARS, hash_password
from heygem_daemon.web.sessions import Sessions
from heygem_daemon.web.throttle import Strikes
from media_factory import write_speech_wav
from web_rig import HASHES, serving, web_settings

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    base = tmp_path_factory.mktemp("websec")
    settings = {"base_dir": str(base), "logging": {"console": False},
                "notify": {"operator_urls": ["json://127.0.0.1:9/alerts"]},
                **web_settings(login_attempts=3, login_user_attempts=4, login_delay_seconds=60)}
    (base / "config.yaml").write_text(yaml.safe_dump(settings))
    yield from serving(base / "config.yaml")


@pytest.fixture(scope="module")
def alice(web):
    """Logged in once for the tests that only need someone logged in (a login costs an argon2 hash)."""
    return web.client("alice", source="127.0.0.21")


def store_of(web) -> Store:
    return Store(web.cfg.folder("state") / "heygem.db")


def audit(web) -> list[dict]:
    import json
    return [json.loads(line) for line in (web.cfg.folder("logs") / "audit.log").read_text().splitlines()]


def cookie_copy(web, client) -> requests.Session:
    copy = requests.Session()
    copy.cookies.update(client.http.cookies)
    return copy


# --- sessions end on the server --------------------------------------------------------------------


def test_after_logout_a_copied_cookie_opens_nothing_and_its_csrf_token_is_refused(web):
    alice = web.client("alice")
    alice.get("/jobs")
    stolen, old_token = cookie_copy(web, alice), alice.csrf
    assert stolen.get(web.url + "/jobs", timeout=30).status_code == 200
    assert alice.http.post(web.url + "/logout", data={"csrf": alice.csrf}, timeout=30).url.endswith("/login")
    page = stolen.get(web.url + "/jobs", headers={"Accept": "text/html"}, timeout=30)
    assert page.url.endswith("/login")
    post = stolen.post(web.url + "/jobs/anything/cancel", data={"csrf": old_token}, allow_redirects=False,
                       timeout=30)
    assert post.status_code == 401


def test_a_live_stream_ends_when_its_session_is_logged_out(web):
    alice = web.client("alice", source="127.0.0.2")
    alice.get("/jobs")
    ended = threading.Event()

    def follow() -> None:
        with alice.http.get(web.url + "/jobs/live", stream=True, timeout=30) as events:
            for _ in events.iter_content(None):
                pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.2)
    assert not ended.is_set()
    cookie_copy(web, alice).post(web.url + "/logout", data={"csrf": alice.csrf}, timeout=30)
    assert ended.wait(15)


def test_revoking_a_user_from_the_command_line_ends_the_sessions_at_once(web, capsys):
    bob = web.client("bob")
    assert bob.get("/jobs").status_code == 200
    config = str(web.config_path)
    assert main(["-c", config, "web", "sessions", "list"]) == 0
    assert "bob\t127.0.0.1\tsince" in capsys.readouterr().out
    assert main(["-c", config, "web", "sessions", "revoke", "bob"]) == 0
    assert capsys.readouterr().out.strip() == "bob: 1 session(s) ended"
    assert bob.get("/jobs").status_code == 401


def test_a_changed_password_or_a_removed_user_ends_the_sessions_and_the_store_keeps_no_session_id(tmp_path):
    store = Store(tmp_path / "heygem.db")
    cookie: dict = {}
    Sessions(Web(users={"alice": HASHES["alice"]}), store).open(cookie, "alice", "192.0.2.1")
    assert Sessions(Web(users={"alice": HASHES["alice"]}), store).user(cookie) == "alice"
    assert cookie["sid"].encode() not in (tmp_path / "heygem.db").read_bytes() + (
        tmp_path / "heygem.db-wal").read_bytes()
    assert Sessions(Web(users={"bob": HASHES["bob"]}), store).user(cookie) is None
    changed = Sessions(Web(users={"alice": hash_password("a new one")}), store)
    assert changed.user(cookie) is None
    assert changed.tidy() == 1 and store.web.sessions() == []


# --- throttling by real address --------------------------------------------------------------------


def test_a_forged_forwarded_for_from_an_untrusted_peer_is_ignored_so_guessing_is_slowed(web):
    guesser = web.client(None, source="127.0.0.3")
    guesser.get("/login")
    answers = [guesser.http.post(web.url + "/login", timeout=30, headers={"X-Forwarded-For": f"198.51.100.{i}"},
                                 data={"user": f"mallory{i}", "password": "guess", "csrf": guesser.csrf})
               for i in range(5)]
    assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]


def test_a_user_guessed_at_from_many_addresses_is_slowed_there_but_logs_in_from_her_own(web):
    web.client("carol", source="127.0.0.10")  # where she logs in
    for n in range(11, 15):  # four guessers, one guess each: no address is slowed, the user is
        assert web.client(None, source=f"127.0.0.{n}").login("carol", "guess").status_code == 401
    assert web.client(None, source="127.0.0.15").login("carol", "guess").status_code == 429
    assert web.client(None, source="127.0.0.10").login("carol", "carol-pass-3").status_code == 200
    store, deadline = store_of(web), time.monotonic() + 15  # the alert is recorded on a thread of its own
    while not any("failed logins for user carol" in n.body for n in store.outbox.select() if n.kind == "alert"):
        assert time.monotonic() < deadline, "no operator alert in the outbox"
        time.sleep(0.05)


def test_after_the_free_attempts_each_wait_doubles_and_a_quiet_key_is_forgotten():
    now = [1000.0]
    strikes = Strikes(2, Web(login_delay_seconds=1, login_window_seconds=100), lambda: now[0])
    waits = []
    for _ in range(10):
        strikes.strike("192.0.2.1")
        waits.append(strikes.wait("192.0.2.1"))
    assert waits == [0, 1, 2, 4, 8, 16, 32, 50, 50, 50]  # at most half the window
    now[0] += 100
    assert strikes.wait("192.0.2.1") == 0 and len(strikes) == 0


# --- bounded memory before login -------------------------------------------------------------------


def test_the_throttle_keeps_at_most_its_bound_of_keys_and_the_newest_stay():
    strikes = Strikes(1, Web(), time.monotonic, max_keys=100)
    for n in range(1000):
        strikes.strike(f"name-{n}")
    assert len(strikes) == 100 and strikes.wait("name-999") > 0 and strikes.wait("name-0") == 0


def test_a_body_larger_than_a_form_is_refused_before_it_is_read_and_a_long_name_is_never_kept(web):
    client = web.client(None, source="127.0.0.20")
    client.get("/login")
    huge = {"user": "u" * 2**20, "password": "x", "csrf": client.csrf}
    assert client.http.post(web.url + "/login", data=huge, timeout=30).status_code == 413
    chunked = iter([b"user=", b"u" * 2**20])  # no Content-Length: counted as it arrives
    answer = client.http.post(web.url + "/login", data=chunked, headers={**FORM, "X-CSRF-Token": client.csrf},
                              timeout=30)
    assert answer.status_code == 413
    names = web.app.state.console.logins.names
    before = len(names)
    assert client.login("u" * (MAX_USER_CHARS + 1), "x").status_code == 401
    assert len(names) == before


# --- query values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["page=9223372036854775807", "page=1_0", "page=%2B2", "page=0", "page=two",
                                   "state=bogus", "q=" + "x" * 201])
def test_a_query_value_no_page_link_makes_is_a_400_with_its_reason(alice, query):
    for path in ("/jobs", "/jobs/live"):
        answer = alice.get(f"{path}?{query}")
        assert answer.status_code == 400 and query.split("=")[0] in answer.json()["reason"]


@pytest.mark.parametrize("length, reason", [("1e3", "is not a whole number"), ("1_000", "is not a whole number"),
                                            ("+5", "is not a whole number"), (None, "is missing")])
def test_an_upload_length_that_is_not_plain_digits_is_refused_as_invalid(web, alice, length, reason):
    alice.get("/upload")
    headers = alice.headers(**({"Upload-Length": length} if length else {}))
    answer = alice.http.post(web.url + "/tus/", headers=headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["reason"].startswith("Upload-Length") and \
        reason in answer.json()["reason"]


def test_the_favicon_is_served_to_anyone(web):
    icon = requests.get(web.url + "/favicon.ico", timeout=30)
    assert icon.status_code == 200 and icon.content[:4] == b"\x00\x00\x01\x00"


# --- who may act on a job ----------------------------------------------------------------------------


def test_only_the_uploader_or_an_admin_may_cancel_a_job_and_the_audit_names_who(web, alice, tmp_path,
                                                                               portrait_jpg):
    voice = write_speech_wav(tmp_path / "hello.wav", 1.0)
    handed = alice.submit([alice.upload(voice), alice.upload(portrait_jpg)], name="alices job",
                          engine="preview", preset="480p")
    assert handed.status_code == 200, handed.text
    store = store_of(web)
    job = store.jobs.create(handed.json()["job"], {})  # the daemon's claim, after the hand-over
    store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", "/out/a.mp4")])
    bob = web.client("bob", source="127.0.0.23")
    bob.get(f"/jobs/{job.name}")
    refused = bob.http.post(f"{web.url}/jobs/{job.name}/cancel", data={"csrf": bob.csrf}, timeout=30)
    assert refused.status_code == 403 and "only alice (who uploaded it) or an admin" in refused.text
    assert store.jobs.get(job.id).state == "queued"
    assert {"event": "web cancel refused", "user": "bob", "owner": "alice"}.items() <= audit(web)[-1].items()
    alice.get(f"/jobs/{job.name}")
    done = alice.http.post(f"{web.url}/jobs/{job.name}/cancel", data={"csrf": alice.csrf}, timeout=30)
    assert done.status_code == 200 and store.jobs.get(job.id).state == "cancelling"
    assert {"event": "web cancel", "user": "alice", "owner": "alice", "admin": False}.items() <= \
        audit(web)[-1].items()


def test_a_job_made_before_the_hand_over_of_its_name_is_not_the_uploaders_and_the_row_goes_with_the_job(
        tmp_path):
    store = Store(tmp_path / "heygem.db")
    earlier = store.jobs.create("promo", {})
    store.web.record_owner("promo", "alice", time.time())
    assert store.web.owner("promo", earlier.created_at) is None
    later = time.time() + 1
    assert store.web.owner("promo", later) == "alice"
    store.jobs.set_state(earlier.id, "failed", error={"reason": "r", "hint": "h"})
    store.jobs.delete_finished(later + 10, later + 10)
    assert store.web.owner("promo", later) is None
