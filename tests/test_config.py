import sys
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from config_examples import CONFIG_YAML, commented_engine_example
from pydantic import BaseModel

from heygem_daemon.cli import main
from heygem_daemon.config import Config, ConfigError, Remote, _prepare_folders, load_config


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


def test_a_folder_another_process_creates_between_the_check_and_mkdir_is_taken_as_it_is(tmp_path):
    """Issue 20 item 7: the daemon and a worker (or a restart and its predecessor) start at once."""
    cfg = load_config(write(tmp_path, f"base_dir: {tmp_path}\n"), environ={}, prepare=False)
    raced: list[Path] = []

    def other_process_wins(frame: types.FrameType, event: str, arg: object) -> None:
        # At the moment _prepare_folders calls Path.mkdir, the folder appears (the other process's mkdir).
        called_by_prepare = frame.f_back is not None and frame.f_back.f_code is _prepare_folders.__code__
        if event == "call" and frame.f_code.co_name == "mkdir" and called_by_prepare:
            target = frame.f_locals["self"]
            target.mkdir()
            raced.append(target)

    sys.setprofile(other_process_wins)
    try:
        _prepare_folders(cfg)
    finally:
        sys.setprofile(None)
    assert raced and all(path.is_dir() for path in raced)
    assert all(cfg.folder(key).is_dir() for key in ("inbox", "work", "outputs", "failed", "archive", "state", "logs"))


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


def _sections(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """("one", Model) for a section (Model or Model | None), ("each", Model) for dict[str, Model], else None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return "each", args[1]
    for candidate in (args if origin in (Union, types.UnionType) else (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return "one", candidate
    return None


def key_gaps(data: dict[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """Keys the model has that the file lacks, and keys the file has that the model lacks, at every depth."""
    gaps = [f"{where}{key}: missing from config.yaml" for key in model.model_fields if key not in data]
    for key, value in data.items():
        field = model.model_fields.get(key)
        section = _sections(field.annotation) if field else None
        if field is None:
            gaps.append(f"{where}{key}: in config.yaml but not a config key")
        elif section and section[0] == "one" and isinstance(value, dict):
            gaps += key_gaps(value, section[1], f"{where}{key}.")
        elif section and isinstance(value, dict):
            for name, entry in value.items():
                gaps += key_gaps(entry, section[1], f"{where}{key}.{name}.")
    return gaps


def shipped_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_YAML.read_text())  # type: ignore[no-any-return]


def test_config_yaml_lists_every_key_of_the_models_and_no_other():
    data = shipped_config()
    # workers.remote is off by default, so config.yaml shows it commented out: that block is checked too.
    data["workers"]["remote"] = commented_engine_example("remote")
    assert key_gaps(data, Config) == []


def test_config_yaml_values_are_the_embedded_defaults():
    # engines: holds each engine's own section (checked by its tests); preview's is empty, like the default.
    shown = Config.model_validate(shipped_config())
    assert shown.model_dump(exclude={"engines"}) == Config().model_dump(exclude={"engines"})
    assert shown.engines == {"preview": {}}


def test_the_commented_remote_block_shows_the_defaults_of_its_optional_keys():
    example = Remote.model_validate(commented_engine_example("remote"))
    # broker_url and queues have no default; path_map's {} default is shown by an example mapping.
    plain = [name for name, field in Remote.model_fields.items()
             if not field.is_required() and not isinstance(field.get_default(call_default_factory=True), dict)]
    assert {n: getattr(example, n) for n in plain} == {n: Remote.model_fields[n].default for n in plain}
