"""The HTTP API (/api/v1) over HTTP: the real app on 127.0.0.1, real uploads, the real store; tokens made by
the CLI as an operator makes them."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
import requests
import yaml

from heygem_daemon.cli import main
from heygem_daemon.state import KeyUse, Store
from heygem_daemon.state.tasks import NewTask
from heygem_daemon.web.tokens import SCOPES, Tokens, create_token, parse_scopes
from heygem_daemon.web.uploads import UPLOADS_DIR
from media_factory import truncate, write_speech_wav
from s3_server import credentials_env
from web_rig import ApiClient, WebServer, console_config, serving


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    console_config(base, max_upload_mb=1, api_multipart_mb=1)
    return base


@pytest.fixture(scope="module")
def web(base):
    yield from serving(base / "config.yaml")


def make_token(base, name: str, user: str, scope: str, capsys) -> str:
    assert main(["-c", str(base / "config.yaml"), "web", "token", "create", name, "--user", user,
                 "--scope", scope]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def tokens(web):
    """shop (alice) and hr (bob) read and write; reader (alice) only reads."""
    store = Store(web.cfg.folder("state") / "heygem.db")
    return {name: create_token(store, name, user, parse_scopes(scope)) for name, user, scope in (
        ("shop", "alice", "jobs:read,jobs:write"), ("hr", "bob", "jobs:read,jobs:write"),
        ("reader", "alice", "jobs:read"))}


@pytest.fixture(scope="module")
def shop(web, tokens) -> ApiClient:
    return ApiClient(web.url, tokens["shop"])


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    return write_speech_wav(tmp_path_factory.mktemp("media") / "hello.wav", 1.0)


def audit(web) -> list[dict]:
    return [json.loads(line) for line in (web.cfg.folder("logs") / "audit.log").read_text().splitlines()]


def multipart(client: ApiClient, files: dict, options: dict | None = None, **kw) -> requests.Response:
    parts = [("files", (name, path.read_bytes())) for name, path in files.items()]
    return client.api("POST", "/jobs/multipart", files=parts, data={"options": json.dumps(options or {})}, **kw)


def test_a_token_is_printed_once_kept_only_as_its_digest_listed_with_its_last_use_and_revoked(
        web, base, capsys):
    token = make_token(base, "crm", "alice", "jobs:read", capsys)
    assert token.startswith("hgd_") and len(token) > 40
    crm = ApiClient(web.url, token)
    assert crm.api("GET", "/jobs").status_code == 200
    assert main(["-c", str(base / "config.yaml"), "web", "token", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("crm\t")]
    assert "alice\tjobs:read" in listed[0] and "last used never" not in listed[0] and token not in listed[0]
    rows = sqlite3.connect(web.cfg.folder("state") / "heygem.db").execute("SELECT * FROM api_tokens").fetchall()
    assert token not in repr(rows)
    assert main(["-c", str(base / "config.yaml"), "web", "token", "revoke", "crm"]) == 0
    refused = crm.api("GET", "/jobs")
    assert refused.status_code == 401 and refused.json()["reason"] == "unknown or revoked token"


def test_without_a_token_or_with_only_a_session_cookie_the_api_answers_401(web, tokens):
    alice = web.client("alice")  # logged in: the console's cookie is no key to the API
    answer = alice.http.get(web.url + "/api/v1/jobs", timeout=30)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    made = alice.http.post(web.url + "/api/v1/jobs", json={"uploads": []}, timeout=30,
                           headers={"X-CSRF-Token": alice.csrf})
    assert made.status_code == 401


def test_behind_a_login_proxy_its_user_header_opens_nothing_under_the_api_but_a_token_does(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"base_dir": str(tmp_path), "logging": {"console": False},
                                                          "web": {"enabled": True, "auth": "proxy"}}))
    server = WebServer(tmp_path / "config.yaml").start()
    try:
        token = create_token(Store(server.cfg.folder("state") / "heygem.db"), "erp", "dora", ("jobs:read",))
        named = requests.get(server.url + "/api/v1/jobs", headers={"X-Remote-User": "dora"}, timeout=30)
        assert named.status_code == 401
        assert ApiClient(server.url, token).api("GET", "/jobs").status_code == 200
    finally:
        server.stop()


def test_a_read_only_token_reads_but_may_not_create_cancel_or_upload(web, tokens, wav):
    reader = ApiClient(web.url, tokens["reader"])
    assert reader.api("GET", "/health").status_code == 200
    refused = reader.api("POST", "/jobs", json={"uploads": ["0" * 32, "1" * 32]})
    assert refused.status_code == 403 and "jobs:write" in refused.json()["reason"]
    assert reader.create("hello.wav", 10).status_code == 403


def test_tus_uploads_made_with_the_token_become_a_job_with_its_options_and_an_audit_line(web, shop, wav,
                                                                                        portrait_jpg):
    ids = [shop.upload(wav), shop.upload(portrait_jpg, "anna.jpg")]
    options = {"name": "from tus", "engine": "preview", "preset": "480p", "priority": "high", "upload": False,
               "pairs": [{"audio": "hello.wav", "portrait": "anna.jpg", "name": "welcome"}],
               "notify": ["json://127.0.0.1:9/hook"]}
    answer = shop.api("POST", "/jobs", json={"uploads": ids, **options})
    assert answer.status_code == 201, answer.text
    assert answer.json()["ref"] == "from tus" and answer.json()["state"] == "received"
    folder = web.cfg.folder("inbox") / "from tus"
    assert sorted(p.name for p in folder.iterdir()) == [".ready", "anna.jpg", "hello.wav", "job.yaml"]
    assert yaml.safe_load((folder / "job.yaml").read_text()) == options
    line = audit(web)[-1]
    assert {"event": "api upload", "user": "alice", "token": "shop", "job": "from tus"}.items() <= line.items()
    assert shop.api("GET", "/jobs/from tus").json()["state"] == "received"
    # The job's webhooks go to the token that handed it over.
    assert Store(web.cfg.folder("state") / "heygem.db").web.owner_token("from tus", time.time()) == "shop"


def test_files_in_one_multipart_request_become_a_job(web, shop, wav, portrait_jpg):
    answer = multipart(shop, {"hello.wav": wav, "anna.jpg": portrait_jpg}, {"name": "from multipart"})
    assert answer.status_code == 201, answer.text
    folder = web.cfg.folder("inbox") / answer.json()["ref"]
    assert (folder / "hello.wav").read_bytes() == wav.read_bytes() and (folder / ".ready").exists()


def test_a_multipart_request_over_the_limit_is_refused_before_it_is_read(web, shop, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (2 * 2**20))
    answer = multipart(shop, {"big.wav": big, "b.jpg": big})
    assert answer.status_code == 413 and "tus" in answer.json()["hint"]


@pytest.mark.parametrize("case", ["pairs name a missing file", "cut audio", "unknown engine"])
def test_a_job_intake_would_refuse_is_422_with_intakes_reason_and_hint_and_nothing_stays(
        web, shop, wav, portrait_jpg, tmp_path, case):
    files, options = {"hello.wav": wav, "anna.jpg": portrait_jpg}, {"name": f"refused {case}"}
    if case == "pairs name a missing file":
        options["pairs"] = [{"audio": "hello.wav", "portrait": "ben.jpg"}]
        expected = ("job.yaml names 'ben.jpg', but the folder has no such file", "check the spelling or add the file")
    elif case == "cut audio":
        files["hello.wav"] = truncate(write_speech_wav(tmp_path / "cut.wav", 2.0), 0.5)
        expected = None
    else:
        options["engine"] = "nonesuch"
        expected = None
    before = set((web.cfg.folder("work") / UPLOADS_DIR).iterdir())
    answer = multipart(shop, files, options)
    assert answer.status_code == 422 and answer.json()["hint"]
    if expected:
        assert (answer.json()["reason"], answer.json()["hint"]) == expected
    if case == "cut audio":
        assert "cut short" in answer.json()["reason"]
    assert not (web.cfg.folder("inbox") / options["name"]).exists()
    assert set((web.cfg.folder("work") / UPLOADS_DIR).iterdir()) == before  # its files went with the refusal


def test_the_same_idempotency_key_returns_the_first_job_even_after_a_restart_and_another_body_is_409(
        web, base, tokens, wav, portrait_jpg):
    files = {"hello.wav": wav, "anna.jpg": portrait_jpg}
    key = {"Idempotency-Key": "order-4711"}
    first_process = WebServer(base / "config.yaml").start()
    first = multipart(ApiClient(first_process.url, tokens["shop"]), files, {"name": "once"}, headers=key)
    first_process.stop()
    second_process = WebServer(base / "config.yaml").start()  # the store is all they share
    try:
        retried = multipart(ApiClient(second_process.url, tokens["shop"]), files, {"name": "once"}, headers=key)
        other = multipart(ApiClient(second_process.url, tokens["shop"]), files, {"name": "twice"}, headers=key)
    finally:
        second_process.stop()
    assert first.status_code == 201 and retried.status_code == 201
    assert retried.json()["ref"] == first.json()["ref"] == "once" and retried.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409 and "another body" in other.json()["reason"]
    assert not (web.cfg.folder("inbox") / "once-2").exists() and not (web.cfg.folder("inbox") / "twice").exists()
    assert [line["event"] for line in audit(web) if line["job"] == "once"] == ["api upload", "api upload replayed"]


def test_two_requests_racing_with_one_key_make_one_job(web, tokens, wav, portrait_jpg):
    files = {"hello.wav": wav, "anna.jpg": portrait_jpg}
    answers: list[requests.Response] = []
    racers = [threading.Thread(target=lambda: answers.append(multipart(
        ApiClient(web.url, tokens["shop"]), files, {"name": "raced"}, headers={"Idempotency-Key": "race-1"})))
        for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    made = [a for a in answers if a.status_code == 201]
    assert made and {a.json()["ref"] for a in made} == {"raced"}
    assert all(a.status_code == 409 and a.headers["Retry-After"] for a in answers if a.status_code != 201)
    assert [p.name for p in web.cfg.folder("inbox").iterdir() if p.name.startswith("raced")] == ["raced"]


def test_cancel_is_the_clis_request_audited_with_the_token_and_only_the_owner_or_an_admin_may(web, tokens, shop):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("api cancel", {})
    store.web.record_owner("api cancel", "alice", job.created_at - 1)
    store.jobs.queue(job.id, [NewTask("a", "/in/a.wav", "/in/a.jpg", "/out/api cancel/a.mp4")])
    bob = ApiClient(web.url, tokens["hr"])
    refused = bob.api("POST", "/jobs/api cancel/cancel")
    assert refused.status_code == 403 and "alice" in refused.json()["reason"]
    answer = shop.api("POST", "/jobs/api cancel/cancel")
    assert answer.status_code == 200 and "cancelling" in answer.json()["message"]
    assert answer.json()["job"]["state"] == "cancelling" and store.jobs.get(job.id).state == "cancelling"
    assert {"event": "api cancel", "user": "alice", "token": "shop"}.items() <= audit(web)[-1].items()
    again = shop.api("POST", "/jobs/api cancel/retry")  # not failed (yet): the CLI's reason, as a conflict
    assert again.status_code == 409 and "only failed jobs can be retried" in again.json()["reason"]
    assert shop.api("POST", "/jobs/no such job/cancel").status_code == 404


def test_a_job_shows_its_videos_links_with_expiry_and_its_problem(web, shop):
    store = Store(web.cfg.folder("state") / "heygem.db")
    job = store.jobs.create("api shown", {"priority": "low"})
    store.jobs.queue(job.id, [NewTask("anna", "/in/a.wav", "/in/a.jpg", "/out/api shown/anna.mp4")])
    store.jobs.set_state(job.id, "failed", error={"kind": "bad_input", "reason": "no face", "hint": "crop it"})
    folder = web.cfg.folder("outputs") / "api shown"
    folder.mkdir(parents=True)
    (folder / "links.json").write_text(json.dumps({"job": "api shown", "written_at": "2026-11-24T00:00:00Z", "files": [
        {"file": "anna.mp4", "size": 10, "path": None, "link": "https://b.example/anna.mp4?sig",
         "expires_at": "2026-12-01T00:00:00Z"}], "zip": None}))
    shown = shop.api("GET", "/jobs/api shown").json()
    assert shown["state"] == "failed" and shown["priority"] == "low" and shown["videos"][0]["name"] == "anna"
    assert shown["links"] == [{"file": "anna.mp4", "size": 10, "sha256": None, "link": "https://b.example/anna.mp4?sig",
                               "expires_at": "2026-12-01T00:00:00Z"}]
    assert shown["problem"] == {"kind": "bad_input", "reason": "no face", "hint": "crop it"}
    links = shop.api("GET", "/jobs/api shown/links").json()
    assert links["job"] == "api shown" and links["files"] == shown["links"]


def test_the_job_list_pages_newest_first_by_cursor_and_filters_by_state(web, shop):
    store = Store(web.cfg.folder("state") / "heygem.db")
    names = [store.jobs.create(f"listed-{i}", {}).name for i in range(7)]
    store.jobs.set_state(store.jobs.find("listed-3").id, "failed")
    seen, cursor = [], None
    while True:
        page = shop.api("GET", "/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["ref"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    listed = [n for n in seen if n.startswith("listed-")]
    assert listed == names[::-1] and len(seen) == len(set(seen))
    failed = shop.api("GET", "/jobs", params={"state": "failed", "limit": 200}).json()["jobs"]
    assert "listed-3" in [j["ref"] for j in failed] and all(j["state"] == "failed" for j in failed)
    assert shop.api("GET", "/jobs", params={"cursor": "!!"}).status_code == 422


def test_each_token_has_its_own_rate_limit_refilled_over_the_minute(web):
    now = [0.0]
    limits = Tokens(Store(web.cfg.folder("state") / "heygem.db"), lambda u: True, 60, clock=lambda: now[0])
    assert [limits.wait("a") for _ in range(60)] == [0.0] * 60
    assert limits.wait("a") == pytest.approx(1.0) and limits.wait("b") == 0.0
    now[0] = 2.0
    assert limits.wait("a") == 0.0


def test_the_openapi_document_is_3_1_and_the_docs_page_loads_no_script(web):
    spec = requests.get(web.url + "/api/v1/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.1") and "/jobs" in spec["paths"] and "JobOut" in spec["components"]["schemas"]
    page = requests.get(web.url + "/api/v1/docs", timeout=30)
    assert page.status_code == 200 and "<script" not in page.text and "POST /api/v1/jobs/multipart" in page.text


def test_a_key_is_kept_24_hours_and_one_cut_off_before_it_made_a_job_frees_after_10_minutes(web, monkeypatch):
    store = Store(web.cfg.folder("state") / "heygem.db")
    now = time.time()
    assert store.api.claim_key("t", "settled", "body") is None
    store.api.settle_key("t", "settled", "job-1")
    assert store.api.claim_key("t", "cut off", "body") is None  # the process died before it settled
    monkeypatch.setattr("heygem_daemon.state.api.time.time", lambda: now + 601)
    assert store.api.claim_key("t", "settled", "body") == KeyUse("body", "job-1")
    assert store.api.claim_key("t", "cut off", "body") is None  # claimed afresh
    monkeypatch.setattr("heygem_daemon.state.api.time.time", lambda: now + 24 * 3600 + 1)
    assert store.api.claim_key("t", "settled", "other body") is None


@pytest.fixture
def s3_api(tmp_path, moto_server, monkeypatch):
    for k, v in credentials_env().items():
        monkeypatch.setenv(k, v)
    bucket = moto_server.new_bucket()
    config = console_config(tmp_path, api_s3_input_prefix="inputs/")
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "s3": moto_server.s3_settings(bucket)}))
    server = WebServer(config).start()
    token = create_token(Store(server.cfg.folder("state") / "heygem.db"), "lms", "alice", SCOPES)
    yield server, ApiClient(server.url, token), moto_server.client(), bucket
    server.stop()


def test_objects_under_the_input_prefix_become_a_job_and_keys_outside_it_or_missing_are_422(
        s3_api, wav, portrait_jpg):
    web, client, s3, bucket = s3_api
    s3.put_object(Bucket=bucket, Key="inputs/course/lesson.wav", Body=wav.read_bytes())
    s3.put_object(Bucket=bucket, Key="inputs/course/anna.jpg", Body=portrait_jpg.read_bytes())
    s3.put_object(Bucket=bucket, Key="private.wav", Body=wav.read_bytes())
    made = client.api("POST", "/jobs", json={"s3_keys": ["course/lesson.wav", "course/anna.jpg"], "name": "from s3"})
    assert made.status_code == 201, made.text
    folder = web.cfg.folder("inbox") / "from s3"
    assert (folder / "lesson.wav").read_bytes() == wav.read_bytes() and (folder / ".ready").exists()
    above = client.api("POST", "/jobs", json={"s3_keys": ["../private.wav", "course/anna.jpg"]})
    missing = client.api("POST", "/jobs", json={"s3_keys": ["course/anna.jpg", "course/none.wav"]})
    assert above.status_code == 422 and "not a key under the input prefix" in above.json()["reason"]
    assert missing.status_code == 422 and missing.json()["reason"] == ("no object 'course/none.wav' under the input "
                                                                       "prefix")
    assert not list((web.cfg.folder("work") / UPLOADS_DIR).iterdir())  # the object fetched first went too
