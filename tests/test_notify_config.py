"""Where notification targets come from: config, env, a credentials file, job.yaml; and the doctor lines."""

import pytest

from heygem_daemon.config import Config, ConfigError, load_config
from heygem_daemon.notify.outbox import notify_checks
from heygem_daemon.notify.targets import (
    Screened, configured_urls, job_target_urls, operator_urls, refusal, screen_job_targets, target_id,
)
from heygem_daemon.intake.pairing import FileInfo, Plan, Rejection, plan_folder

SLACK = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#general"


def folder(manifest: str, files=("a.wav", "x.jpg")):
    infos = [FileInfo(f"b/{n}", 10, 0, 0o100644) for n in files]
    return plan_folder("b", infos, manifest.encode(), False, {"preview"}, {"480p"})


def test_job_yaml_notify_list_replaces_the_configured_targets():
    plan = folder("notify: [json://127.0.0.1/team-b]\n")
    assert isinstance(plan, Plan) and plan.notify == ["json://127.0.0.1/team-b"]


def test_job_yaml_notify_false_silences_the_job():
    assert folder("notify: false\n").notify == []


def test_job_without_notify_uses_the_configured_targets():
    assert folder("name: x\n").notify is None


def test_job_yaml_notify_that_is_not_a_url_is_refused_with_a_hint():
    out = folder("notify: [team-b]\n")
    assert isinstance(out, Rejection)
    assert "notify" in out.problems[0].reason and "false" in out.problems[0].reason


def test_rejected_folder_keeps_its_notify_override():
    out = folder("notify: false\n", files=("a.wav", "b.wav", "x.jpg", "y.jpg"))
    assert isinstance(out, Rejection) and out.notify == []


def test_env_gives_urls_as_one_space_separated_string(tmp_path):
    cfg = load_config(None, environ={"HEYGEM_NOTIFY__URLS": f"json://127.0.0.1/a {SLACK}"}, prepare=False)
    assert cfg.notify.urls == ["json://127.0.0.1/a", SLACK]
    assert operator_urls(cfg.notify) == cfg.notify.urls


def test_urls_file_from_systemd_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "notify-urls").write_text(f"# team chat\n{SLACK}\n\njson://127.0.0.1/a\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = Config.model_validate({"notify": {"urls": ["json://127.0.0.1/a"],
                                            "urls_file": "${CREDENTIALS_DIRECTORY}/notify-urls"}})
    assert configured_urls(cfg.notify) == ["json://127.0.0.1/a", SLACK]


def test_unreadable_urls_file_is_a_config_error_naming_the_key(tmp_path):
    cfg = Config.model_validate({"notify": {"urls_file": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="notify.urls_file: cannot read"):
        configured_urls(cfg.notify)


def test_config_entry_that_is_not_a_url_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("notify:\n  urls: [s3cr3t-token-value]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={}, prepare=False)
    assert "notify.urls: entry 1 is not a URL" in str(err.value) and "s3cr3t" not in str(err.value)


def test_doctor_passes_urls_apprise_understands_says_it_contacted_none_and_names_no_secret():
    cfg = Config.model_validate({"notify": {"urls": [SLACK, "json://127.0.0.1/hook"]}})
    checks = notify_checks(cfg)
    assert [c.ok for c in checks] == [True, True]  # nothing listens on 127.0.0.1: only the URL was checked
    assert all(c.detail.startswith("URL valid, not contacted: ") for c in checks)
    assert "Slack" in checks[0].detail and "markdown" in checks[0].detail
    assert not any("TIiajkdnlazkcOXrIdevi7FQ" in f"{c.name} {c.detail} {c.fix}" for c in checks)


def test_doctor_fails_a_url_apprise_does_not_understand_with_a_fix():
    (check,) = notify_checks(Config.model_validate({"notify": {"urls": ["nosuchservice://tokenvalue"]}}))
    assert not check.ok and "nosuchservice://" in check.detail and check.fix
    assert "tokenvalue" not in check.detail


def test_doctor_says_notifications_are_off_when_no_url_is_configured():
    (check,) = notify_checks(Config())
    assert check.ok and "off" in check.detail


# --- notify.job_targets: which job.yaml targets the daemon may send to ----------------------------------

ALLOW = ["slack", "json://chat.example.com", "jsons://[::1]:8443"]


def test_job_targets_are_off_by_default_and_a_yaml_off_means_off(tmp_path):
    assert Config().notify.job_targets == "off"
    (tmp_path / "c.yaml").write_text("notify: {job_targets: off}\n")
    assert load_config(tmp_path / "c.yaml", environ={}, prepare=False).notify.job_targets == "off"
    assert refusal("json://chat.example.com/x", "off") is not None


def test_job_targets_from_the_environment_are_split_on_spaces(tmp_path):
    env = {"HEYGEM_NOTIFY__JOB_TARGETS": "slack json://chat.example.com"}
    assert load_config(None, environ=env, prepare=False).notify.job_targets == ["slack", "json://chat.example.com"]


def test_a_job_targets_entry_with_a_path_or_token_is_refused_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_text("notify: {job_targets: ['json://chat.example.com/hook']}\n")
    with pytest.raises(ConfigError, match=r"notify.job_targets: .*entry 1 .*scheme://host"):
        load_config(tmp_path / "c.yaml", environ={}, prepare=False)


@pytest.mark.parametrize("url", [SLACK, "json://chat.example.com/hook", "JSON://Chat.Example.com:81/",
                                 "jsons://[::1]:8443/a"])
def test_allowed_job_targets(url):
    assert refusal(url, ALLOW) is None


@pytest.mark.parametrize("url, why", [
    ("json://10.0.0.5:8080/x", "host 10.0.0.5 is not allowed"),
    ("json://chat.example.com@10.0.0.5/x", "host 10.0.0.5 is not allowed"),  # where apprise really connects
    ("jsons://[::1]/a", "host ::1 is not allowed"),  # another port than the listed one
    ("discord://1234/abcd", "discord:// is not allowed"),
])
def test_refused_job_targets_say_why(url, why):
    assert why in refusal(url, ALLOW)


def test_screening_keeps_digests_of_the_allowed_and_names_the_refused_without_secrets():
    screened = screen_job_targets([SLACK, "json://10.0.0.5/TOKENxyz"], ALLOW)
    assert screened.ids == [target_id(SLACK)]
    [problem] = screened.refused
    assert problem["reason"].startswith(f"notify entry 2 (json:// #{target_id('json://10.0.0.5/TOKENxyz')[:8]})")
    assert "TOKENxyz" not in repr(screened)


def test_when_every_job_target_is_refused_the_configured_targets_carry_the_messages():
    assert screen_job_targets(["json://10.0.0.5/x"], ALLOW).ids is None
    assert screen_job_targets([], "off") == Screened([])  # notify: false needs no permission
    assert screen_job_targets(None, "off") == Screened(None)


def test_job_target_urls_are_read_back_from_the_kept_job_yaml_and_checked_again(tmp_path):
    kept = "json://chat.example.com/team"
    (tmp_path / "job.yaml").write_text(f"notify: [{kept}, json://10.0.0.5/x]\n")
    ids = [target_id(kept), target_id("json://10.0.0.5/x")]
    assert job_target_urls(tmp_path, ids, ALLOW) == [kept]
    assert job_target_urls(tmp_path, ids, "off") == []
    assert job_target_urls(tmp_path / "gone", ids, ALLOW) == []
