"""Where notification targets come from: config, env, a credentials file, job.yaml; and the doctor lines."""

import pytest

from heygem_daemon.config import Config, ConfigError, load_config
from heygem_daemon.notify.outbox import notify_checks
from heygem_daemon.notify.targets import configured_urls, operator_urls
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


def test_doctor_passes_urls_apprise_understands_and_names_no_secret():
    cfg = Config.model_validate({"notify": {"urls": [SLACK, "json://127.0.0.1/hook"]}})
    checks = notify_checks(cfg)
    assert [c.ok for c in checks] == [True, True]
    assert "Slack" in checks[0].detail and "markdown" in checks[0].detail
    assert not any("TIiajkdnlazkcOXrIdevi7FQ" in f"{c.name} {c.detail} {c.fix}" for c in checks)


def test_doctor_fails_a_url_apprise_does_not_understand_with_a_fix():
    (check,) = notify_checks(Config.model_validate({"notify": {"urls": ["nosuchservice://tokenvalue"]}}))
    assert not check.ok and "nosuchservice://" in check.detail and check.fix
    assert "tokenvalue" not in check.detail


def test_doctor_says_notifications_are_off_when_no_url_is_configured():
    (check,) = notify_checks(Config())
    assert check.ok and "off" in check.detail
