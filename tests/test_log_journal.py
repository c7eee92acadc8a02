"""Console lines carry their syslog priority when their stream is the journal, so `journalctl -p` filters work;
the console stream is stderr unless logging.console_stream says stdout (the container image does)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from heygem_daemon.config import load_config
from heygem_daemon.log import get_logger, setup_logging


@pytest.fixture
def stderr_file(tmp_path):
    with open(tmp_path / "stderr.txt", "w", encoding="utf-8") as fh:
        yield fh
    logging.getLogger().handlers.clear()


def _log_each_level(fh, monkeypatch) -> list[str]:
    # Set here, not in the fixture: pytest's capture puts its own sys.stderr back before the test body runs.
    monkeypatch.setattr(sys, "stderr", fh)
    setup_logging(None, "debug")
    log = get_logger("heygem.test")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    log.error("an error line")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("a failure with its traceback")
    fh.flush()
    return [line for line in open(fh.name, encoding="utf-8").read().splitlines() if line]


def test_lines_carry_syslog_priorities_when_stderr_is_the_journal_stream(stderr_file, monkeypatch):
    fh = stderr_file
    st = os.fstat(fh.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    lines = _log_each_level(fh, monkeypatch)
    first = {tag: next(line for line in lines if tag in line) for tag in ("debug line", "info line",
                                                                           "warning line", "error line")}
    assert first["debug line"].startswith("<7>")
    assert first["info line"].startswith("<6>")
    assert first["warning line"].startswith("<4>")
    assert first["error line"].startswith("<3>")
    traceback = lines[lines.index(next(line for line in lines if "a failure" in line)):]
    assert any("RuntimeError: boom" in line for line in traceback)
    assert all(line.startswith("<3>") for line in traceback)


def test_no_prefix_when_journal_stream_names_another_file(stderr_file, monkeypatch, tmp_path):
    fh = stderr_file
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    lines = _log_each_level(fh, monkeypatch)
    assert any("warning line" in line for line in lines)
    assert not any(line.startswith("<") for line in lines)


def test_no_prefix_without_journal_stream(stderr_file, monkeypatch):
    fh = stderr_file
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = _log_each_level(fh, monkeypatch)
    assert any("error line" in line for line in lines)
    assert not any(line.startswith("<") for line in lines)


def test_console_stream_stdout_puts_lines_on_stdout_not_stderr(tmp_path, monkeypatch):
    cfg = load_config(None, {"HEYGEM_LOGGING__CONSOLE_STREAM": "stdout", "HEYGEM_BASE_DIR": str(tmp_path)},
                      prepare=False)
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as out, \
            open(tmp_path / "err.txt", "w", encoding="utf-8") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            setup_logging(None, "info", console_stream=cfg.logging.console_stream)
            get_logger("heygem.test").warning("a line for docker logs")
        finally:
            logging.getLogger().handlers.clear()
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").startswith("<4>")
    assert "a line for docker logs" in (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert (tmp_path / "err.txt").read_text(encoding="utf-8") == ""
