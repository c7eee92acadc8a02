"""Secrets come from systemd credentials first, then the environment."""

from heygem_daemon.secrets import get_secret


def test_credential_file_wins_and_loses_its_trailing_newline(tmp_path):
    (tmp_path / "s3-key").write_text("s3cr3t\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "S3_KEY": "from-env"}
    assert get_secret("s3-key", "S3_KEY", env) == "s3cr3t"


def test_environment_is_the_fallback_and_missing_is_none(tmp_path):
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "S3_KEY": "from-env"}
    assert get_secret("s3-key", "S3_KEY", env) == "from-env"
    assert get_secret("s3-key", "OTHER", env) is None
    assert get_secret("s3-key", None, {}) is None


def test_a_name_cannot_climb_out_of_the_credentials_folder(tmp_path):
    (tmp_path / "secret").write_text("outside")
    creds = tmp_path / "creds"
    creds.mkdir()
    assert get_secret("../secret", None, {"CREDENTIALS_DIRECTORY": str(creds)}) is None
