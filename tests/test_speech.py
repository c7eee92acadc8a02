"""Speech engines and the speech step, in-process against real parts: Debian's espeak-ng, and the TTS
stand-in (tests/tts_standin.py) on 127.0.0.1 for the heygem-tts engine."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest

from heygem_daemon.config import Config
from heygem_daemon.engines.base import BadInputError, EngineError, OutageError, SetupError, SpeechSpec, TaskSpec
from heygem_daemon.failures import Kind
from heygem_daemon.media.audio import load_clip
from heygem_daemon.speech.espeak import EspeakEngine, EspeakSettings
from heygem_daemon.speech.heygem_tts import HeygemTtsEngine, HeygemTtsSettings
from heygem_daemon.speech.registry import speech_class
from heygem_daemon.speech.step import spoken
from tts_standin import TtsStandin, speech_seconds

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


class Beats:
    """The worker's Reporter as an engine sees it."""

    def __init__(self) -> None:
        self.beats = 0

    def __call__(self, fraction: float) -> None:
        self.beats += 1

    def heartbeat(self) -> None:
        self.beats += 1


@pytest.fixture
def standin():
    s = TtsStandin().start()
    yield s
    s.stop()


def tts(*urls: str, **kw) -> HeygemTtsEngine:
    return HeygemTtsEngine(HeygemTtsSettings(services=list(urls), reference_audio="/code/data/asr/anna.wav",
                                             reference_text="hello this is my voice", **kw))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_both_speech_engines_are_found_through_the_entry_point_registry():
    assert speech_class("espeak") is EspeakEngine and speech_class("heygem-tts") is HeygemTtsEngine


@needs_espeak
def test_espeak_reads_a_script_out_as_decodable_speech(tmp_path):
    EspeakEngine(EspeakSettings()).synthesise("Hello, this is a test.", tmp_path / "a.wav", Beats())
    assert 0.8 < load_clip(tmp_path / "a.wav").duration < 5


def test_espeak_missing_is_a_setup_error_naming_the_package(tmp_path):
    engine = EspeakEngine(EspeakSettings(binary="espeak-ng-not-here"))
    with pytest.raises(SetupError) as err:
        engine.synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert "apt-get install espeak-ng" in err.value.hint


def test_heygem_tts_sends_the_clients_request_and_keeps_the_audio(standin, tmp_path):
    tts(standin.url).synthesise("Hello there.", tmp_path / "a.wav", Beats())
    sent = standin.invokes[0]
    assert sent["text"] == "Hello there." and sent["format"] == "wav" and len(sent["speaker"]) == 36
    assert sent["reference_audio"] == "/code/data/asr/anna.wav" and sent["reference_text"] == "hello this is my voice"
    assert abs(load_clip(tmp_path / "a.wav").duration - speech_seconds("Hello there.")) < 0.01


@pytest.mark.parametrize("mode, error, words", [
    ("http500", EngineError, "HTTP 500"),
    ("json", EngineError, "JSON instead of audio"),
    ("garbage", EngineError, "does not decode"),
    ("http422", BadInputError, "refused the script"),
], ids=["http-500", "json", "undecodable", "http-422"])
def test_a_failure_answer_from_the_tts_service_is_an_error_of_its_kind(standin, tmp_path, mode, error, words):
    standin.mode = mode
    with pytest.raises(EngineError) as err:
        tts(standin.url).synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert type(err.value) is error and words in err.value.reason


def test_a_tts_service_that_hangs_fails_the_attempt_after_the_answer_limit(standin, tmp_path):
    standin.mode = "hang"
    with pytest.raises(EngineError) as err:
        tts(standin.url, answer_seconds=0.5).synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert err.value.kind is Kind.ENGINE and "no answer within 0.5 s" in err.value.reason


def test_no_tts_service_answering_is_an_outage_naming_them(tmp_path):
    down = closed_port_url()
    with pytest.raises(OutageError) as err:
        tts(down).synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert err.value.kind is Kind.OUTAGE and down in err.value.dependency


def test_a_tts_service_that_is_down_is_passed_over_for_one_that_answers(standin, tmp_path):
    tts(closed_port_url(), standin.url).synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert len(standin.invokes) == 1 and (tmp_path / "a.wav").is_file()


def test_workers_send_one_request_at_a_time_to_a_tts_service(standin, tmp_path):
    standin.mode = "hang"
    engines = [tts(standin.url) for _ in range(2)]
    threads = [threading.Thread(target=e.synthesise, args=(f"Hello {i}.", tmp_path / f"{i}.wav", Beats()))
               for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for _ in range(50):
        if standin.invokes:
            break
        threading.Event().wait(0.05)
    threading.Event().wait(0.3)  # the second worker would have sent its request by now
    assert len(standin.invokes) == 1
    standin.mode = "ok"
    standin.release.set()
    for t in threads:
        t.join(10)
    assert len(standin.invokes) == 2 and standin.overlaps == 0


def script_task(tmp_path: Path, url: str, text: str = "Welcome to the team.") -> TaskSpec:
    script = tmp_path / "in" / "hello.txt"
    script.parent.mkdir(exist_ok=True)
    script.write_text(text, encoding="utf-16")
    speech = SpeechSpec("heygem-tts", {"services": [url]}, tmp_path / ".speech-cache", 1000)
    return TaskSpec(task_id=1, job_id="j", name="hello", audio=script, portrait=tmp_path / "p.jpg",
                    output=tmp_path / "o.mp4.part", workdir=tmp_path / "w", preset=Config().preset(), speech=speech)


def test_a_retried_task_takes_its_speech_from_the_cache_without_asking_again(standin, tmp_path):
    task, engines = script_task(tmp_path, standin.url), {}
    first, _ = spoken(task, engines, Beats())
    again, _ = spoken(task, {}, Beats())  # a retry, in a fresh worker process
    assert first.audio == again.audio and first.speech is None and len(standin.invokes) == 1
    assert standin.invokes[0]["text"] == "Welcome to the team."


def test_a_different_script_is_spoken_anew(standin, tmp_path):
    spoken(script_task(tmp_path, standin.url, "One."), {}, Beats())
    spoken(script_task(tmp_path, standin.url, "Two."), {}, Beats())
    assert [i["text"] for i in standin.invokes] == ["One.", "Two."]


def test_a_failed_speech_leaves_nothing_in_the_cache(standin, tmp_path):
    standin.mode = "garbage"
    with pytest.raises(EngineError):
        spoken(script_task(tmp_path, standin.url), {}, Beats())
    assert not list((tmp_path / ".speech-cache").glob("*.wav"))


def test_a_script_task_sent_to_a_remote_worker_keeps_its_speech_step_with_the_cache_as_the_worker_mounts_it(tmp_path):
    from heygem_daemon.generation.celery_app import decode, encode

    task = script_task(tmp_path, "http://127.0.0.1:18180")
    back = decode(encode(task, {str(tmp_path): "/mnt/shared"}), "cuda:0")
    assert back.speech is not None and back.speech.cache == Path("/mnt/shared/.speech-cache")
    assert back.speech.engine == "heygem-tts" and back.audio == Path("/mnt/shared/in/hello.txt")


def test_a_long_script_is_spoken_by_sentence_and_joined_with_a_pause_and_its_cues_follow_the_parts(standin, tmp_path):
    text = "欢迎加入我们的团队！今天是你的第一天。\nWelcome aboard. Version 3.5 is out?"
    task, said = spoken(script_task(tmp_path, standin.url, text), {}, Beats())
    sent = [i["text"] for i in standin.invokes]
    assert sent == ["欢迎加入我们的团队！", "今天是你的第一天。", "Welcome aboard.", "Version 3.5 is out?"]
    assert [c.text for c in said] == sent
    for before, after in zip(said, said[1:]):
        assert abs(after.start - before.end - 0.3) < 1e-6
    for cue, part in zip(said, sent):
        assert abs((cue.end - cue.start) - speech_seconds(part)) < 0.01
    assert abs(load_clip(task.audio).duration - said[-1].end) < 0.01


def test_a_part_that_failed_is_the_only_one_asked_again(standin, tmp_path):
    task = script_task(tmp_path, standin.url, "One. Two. Three.")
    standin.fail_once.add("Two.")
    with pytest.raises(EngineError):
        spoken(task, {}, Beats())
    spoken(task, {}, Beats())  # the retry
    assert [i["text"] for i in standin.invokes] == ["One.", "Two.", "Two.", "Three."]


def test_subtitles_are_written_beside_the_video_as_srt_and_vtt(tmp_path):
    from heygem_daemon.speech.sentences import Cue
    from heygem_daemon.speech.step import write_subtitles

    write_subtitles(tmp_path / "hello", [Cue(0.0, 1.25, "Hello."), Cue(1.55, 62.0, "你好。")])
    assert (tmp_path / "hello.srt").read_text(encoding="utf-8") == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello.\n\n2\n00:00:01,550 --> 00:01:02,000\n你好。\n\n")
    assert (tmp_path / "hello.vtt").read_text(encoding="utf-8").startswith(
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello.\n\n")


def test_a_sentence_over_the_part_limit_is_cut_at_its_last_pause():
    from heygem_daemon.speech.sentences import split_script

    assert split_script("one two three four five six", 12) == ["one two", "three four", "five six"]
    assert split_script("abcdefghij", 4) == ["abcd", "efgh", "ij"]


@needs_espeak
def test_a_command_line_tts_reads_the_script_through_its_argument_template(tmp_path):
    from heygem_daemon.speech.command import CommandSpeechEngine

    args = ["espeak-ng", "-w", "{output}", "-f", "{text_file}"]
    engine = CommandSpeechEngine(CommandSpeechEngine.Settings(args=args))
    engine.synthesise("Good morning.", tmp_path / "a.wav", Beats())
    assert load_clip(tmp_path / "a.wav").duration > 0.3 and list(tmp_path.iterdir()) == [tmp_path / "a.wav"]


@pytest.mark.parametrize("args, codes, error, words", [
    (["sh", "-c", "echo no such voice; exit 3"], [3], BadInputError, "refused the inputs (exit code 3): no such voice"),
    (["sh", "-c", "exit 1"], [], EngineError, "failed (exit code 1)"),
    (["true", "{text}"], [], EngineError, "wrote no audio"),
    (["no-such-tts-program", "{text}"], [], SetupError, "cannot start no-such-tts-program"),
], ids=["bad-input-code", "failure", "no-output", "missing"])
def test_a_command_line_tts_that_fails_is_an_error_of_its_kind(tmp_path, args, codes, error, words):
    from heygem_daemon.speech.command import CommandSpeechEngine

    engine = CommandSpeechEngine(CommandSpeechEngine.Settings(args=args, bad_input_exit_codes=codes))
    with pytest.raises(EngineError) as err:
        engine.synthesise("Hello.", tmp_path / "a.wav", Beats())
    assert type(err.value) is error and words in err.value.reason


def test_a_command_line_tts_template_with_an_unknown_placeholder_is_a_config_error():
    from pydantic import ValidationError

    from heygem_daemon.speech.command import CommandSpeechEngine

    with pytest.raises(ValidationError, match=r"unknown placeholder \{audio\}"):
        CommandSpeechEngine.Settings(args=["tts", "{audio}"])


def test_a_speech_setting_the_engine_does_not_have_fails_the_task_at_once_naming_it(tmp_path):
    task = script_task(tmp_path, "http://127.0.0.1:1")
    task = TaskSpec(**{**task.__dict__, "speech": SpeechSpec("espeak", {"colour": "blue"}, tmp_path / "c", 100)})
    with pytest.raises(SetupError) as err:
        spoken(task, {}, Beats())
    assert "speech.engines.espeak.colour: unknown key" in err.value.reason and "job.yaml" in err.value.hint
