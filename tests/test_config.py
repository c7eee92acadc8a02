from pathlib import Path

import pytest

from heygem_daemon.cli import main
from heygem_daemon.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_embedded_defaults_create_the_folders_under_base_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    for name in ("inbox", "work", "outputs", "failed", "archive", "state", "logs"):
        assert (tmp_path / name).is_dir()
    assert cfg.engine.name == "preview" and cfg.engine.preset == "480p"


def test_relative_base_dir_hangs_off_the_config_file(tmp_path):
    cfg = load_config(write(tmp_path, "base_dir: data\n"), environ={}, prepare=False)
    assert cfg.folder("inbox") == (tmp_path / "data" / "inbox").resolve()


def test_unknown_key_names_the_key_and_the_likely_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "watcher:\n  settle_secnds: 3\n"), environ={})
    assert "watcher.settle_secnds: unknown key; did you mean 'settle_seconds'?" in str(err.value)


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "workers:\n  max_attempts: many\n"), environ={})
    assert "workers.max_attempts" in str(err.value) and "'many'" in str(err.value)


def test_missing_parent_folder_is_an_error_not_created(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "folders:\n  inbox: /nonexistent-share/inbox\n"), environ={})
    assert "folders.inbox" in str(err.value) and "mount" in str(err.value)
    assert not Path("/nonexistent-share").exists()


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="engine.preset 'huge' is not defined"):
        load_config(write(tmp_path, "engine:\n  preset: huge\n"), environ={})


def test_env_overrides_nested_keys(tmp_path):
    cfg = load_config(write(tmp_path, ""), environ={"HEYGEM_WATCHER__SETTLE_SECONDS": "7.5"}, prepare=False)
    assert cfg.watcher.settle_seconds == 7.5


def test_env_override_values_read_as_yaml_like_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "metrics: {port: 9464}\n"), prepare=False, environ={
        "HEYGEM_WATCHER__IGNORE": "[Thumbs.db, '*.tmp']", "HEYGEM_METRICS__PORT": "null",
        "HEYGEM_LOGGING__CONSOLE": "false", "HEYGEM_ENGINES__HEYGEM__URL": "http://127.0.0.1:8383"})
    assert cfg.watcher.ignore == ["Thumbs.db", "*.tmp"] and cfg.metrics.port is None and not cfg.logging.console
    assert cfg.engines == {"heygem": {"url": "http://127.0.0.1:8383"}}


def test_env_override_with_a_typo_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="watcher.setle_seconds: unknown key; did you mean 'settle_seconds'"):
        load_config(write(tmp_path, ""), environ={"HEYGEM_WATCHER__SETLE_SECONDS": "7.5"}, prepare=False)


def test_systemd_credential_overrides_the_file_and_env_overrides_both(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "heygem_s3").write_text("bucket: from-credential\nregion: eu-west-1\n")
    (creds / "aws_secret_access_key").write_text("not a config key\n")
    path = write(tmp_path, "s3: {bucket: from-file, region: us-east-1, key_prefix: '{token}/{file}'}\n")
    cfg = load_config(path, prepare=False, environ={"CREDENTIALS_DIRECTORY": str(creds),
                                                    "HEYGEM_S3__REGION": "from-env"})
    assert (cfg.s3.bucket, cfg.s3.region, cfg.s3.key_prefix) == ("from-credential", "from-env", "{token}/{file}")


def test_invalid_yaml_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "watcher: [unclosed\n"), environ={})


def test_config_check_exits_2_on_a_bad_file(tmp_path, capsys):
    assert main(["config", "check", str(write(tmp_path, "workers:\n  devices: [gpu0]\n"))]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err


def test_config_check_accepts_the_shipped_config(capsys):
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    assert main(["config", "check", str(shipped)]) == 0
    assert "OK" in capsys.readouterr().out


def test_unknown_engine_setting_is_refused(tmp_path, capsys):
    assert main(["config", "check", str(write(tmp_path, "engines:\n  preview:\n    wobble: 3\n"))]) == 2
    assert "engines.preview.wobble: unknown key" in capsys.readouterr().err
