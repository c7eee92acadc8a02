"""Scripts (.txt) at intake: paired like audio, read in the encodings people save them in, or refused."""

from __future__ import annotations

import codecs
import stat
from pathlib import Path

import pytest

from heygem_daemon.config import Limits
from heygem_daemon.intake.inspect import inspect_inputs
from heygem_daemon.intake.pairing import FileInfo, Plan, Rejection, plan_folder, plan_loose
from heygem_daemon.media.face_spec import FaceRule
from heygem_daemon.speech.text import read_script

REG = stat.S_IFREG | 0o644
CHINESE = "欢迎加入我们的团队！今天是你的第一天。"


def f(rel: str) -> FileInfo:
    return FileInfo(rel, 10, 0, REG)


def test_a_loose_script_and_a_portrait_of_the_same_stem_make_one_video():
    plan = plan_loose([f("hello.txt"), f("hello.jpg")], timed_out=False)
    assert isinstance(plan, Plan)
    assert [(p.audio, p.portrait, p.name) for p in plan.pairs] == [("hello.txt", "hello.jpg", "hello")]


def test_a_folder_with_one_portrait_and_n_scripts_makes_n_videos():
    plan = plan_folder("welcome", [f("welcome/anna.jpg"), f("welcome/ben.txt"), f("welcome/cara.txt")], None,
                       False, {"preview"}, {"480p"})
    assert isinstance(plan, Plan)
    assert [(p.audio, p.name) for p in plan.pairs] == [("welcome/ben.txt", "ben"), ("welcome/cara.txt", "cara")]


def test_job_yaml_pairs_take_a_script_instead_of_audio():
    manifest = b"pairs:\n  - {script: intro.txt, portrait: anna.jpg, name: intro}\n"
    plan = plan_folder("job", [f("job/anna.jpg"), f("job/intro.txt")], manifest, False, {"preview"}, {"480p"})
    assert isinstance(plan, Plan) and plan.pairs[0].audio == "job/intro.txt"


def test_job_yaml_pair_with_both_audio_and_script_is_refused_with_the_rule():
    manifest = b"pairs:\n  - {script: intro.txt, audio: a.wav, portrait: anna.jpg}\n"
    out = plan_folder("job", [f("job/anna.jpg"), f("job/intro.txt"), f("job/a.wav")], manifest, False,
                      {"preview"}, {"480p"})
    assert isinstance(out, Rejection) and "either audio" in out.problems[0].reason


@pytest.mark.parametrize("encoded", [
    CHINESE.encode("utf-8"),
    codecs.BOM_UTF8 + CHINESE.encode("utf-8"),
    CHINESE.encode("utf-16"),  # Notepad's "Unicode": little-endian with a byte-order mark
    codecs.BOM_UTF16_BE + CHINESE.encode("utf-16-be"),
    CHINESE.encode("gb18030"),
    CHINESE.encode("gbk"),
], ids=["utf8", "utf8-bom", "utf16-le-bom", "utf16-be-bom", "gb18030", "gbk"])
def test_a_script_is_read_in_the_encoding_it_was_saved_in(tmp_path, encoded):
    path = tmp_path / "s.txt"
    path.write_bytes(encoded)
    assert read_script(path, 1000) == CHINESE


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b" \r\n\t\n", "holds no words"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "zero bytes"),
    ("Grüße aus München, café crème".encode("cp1252"), "encoding"),
    ("hello".encode("utf-16-le"), "UTF-16 saved without a byte-order mark"),
    (b"x" * 50, "at most 40 (limits.max_script_chars)"),
], ids=["empty", "blank", "binary", "windows-1252", "utf16-no-bom", "too-long"])
def test_a_script_that_cannot_be_read_out_is_refused_with_a_reason_and_a_hint(tmp_path, content, words):
    (tmp_path / "s.txt").write_bytes(content)
    found = inspect_inputs(str(tmp_path), ["s.txt"], Limits(max_script_chars=40), FaceRule.NONE)
    assert len(found.problems) == 1 and words in found.problems[0].reason
    assert found.problems[0].hint


def test_an_unreadable_encoding_is_refused_naming_the_encoding_to_use(tmp_path):
    (tmp_path / "s.txt").write_bytes("Grüße aus München".encode("cp1252"))
    problem = inspect_inputs(str(tmp_path), ["s.txt"], Limits(), FaceRule.NONE).problems[0]
    assert "UTF-8" in problem.hint


def test_a_good_script_passes_the_intake_check_with_its_digest(tmp_path):
    Path(tmp_path / "s.txt").write_text("Hello there.", encoding="utf-8")
    found = inspect_inputs(str(tmp_path), ["s.txt"], Limits(), FaceRule.NONE)
    assert found.problems == [] and len(found.digests["s.txt"]) == 64


def test_job_yaml_speech_picks_the_voice_for_its_scripts_over_the_config():
    from heygem_daemon.config import Config
    from heygem_daemon.generation.workers import speech_spec

    plan = plan_folder("job", [f("job/anna.jpg"), f("job/hi.txt")], b"speech: {voice: zh, pitch: 40}\n", False,
                       {"preview"}, {"480p"})
    assert isinstance(plan, Plan) and plan.speech == {"voice": "zh", "pitch": 40}
    cfg = Config.model_validate({"speech": {"engines": {"espeak": {"voice": "en", "words_per_minute": 140}}}})
    spec = speech_spec(cfg, plan.speech)
    assert spec.engine == "espeak" and spec.settings == {"voice": "zh", "pitch": 40, "words_per_minute": 140}


def test_the_same_files_with_another_job_speech_are_not_a_duplicate():
    from heygem_daemon.intake.claim import fingerprint

    files = [f("job/anna.jpg"), f("job/hi.txt")]
    plain = plan_folder("job", files, None, False, {"preview"}, {"480p"})
    chinese = plan_folder("job", files, b"speech: {voice: zh}\n", False, {"preview"}, {"480p"})
    digests = {"job/anna.jpg": "a", "job/hi.txt": "b"}
    assert isinstance(plain, Plan) and isinstance(chinese, Plan)
    assert fingerprint(plain, digests, "preview", "480p") != fingerprint(chinese, digests, "preview", "480p")


def test_job_yaml_script_naming_an_audio_file_is_refused_saying_what_it_must_be():
    manifest = b"pairs:\n  - {script: a.wav, portrait: anna.jpg}\n"
    out = plan_folder("job", [f("job/anna.jpg"), f("job/a.wav")], manifest, False, {"preview"}, {"480p"})
    assert isinstance(out, Rejection) and "listed as script but is not a .txt file" in out.problems[0].reason
