import stat

import pytest

from heygem_daemon.intake.pairing import FileInfo, Plan, Rejection, Wait, plan_folder, plan_loose, safe_name

REG = stat.S_IFREG | 0o644
ENGINES, PRESETS = {"preview"}, {"480p", "720p"}


def f(rel: str, mode: int = REG) -> FileInfo:
    return FileInfo(rel, 10, 0, mode)


def folder(files: list[str], manifest: str | None = None, timed_out: bool = False):
    return plan_folder("batch", [f(f"batch/{n}") for n in files],
                       manifest.encode() if manifest is not None else None, timed_out, ENGINES, PRESETS)


def test_loose_same_stem_pair_is_one_video_named_after_the_stem():
    plan = plan_loose([f("alice.wav"), f("alice.jpg")], timed_out=False)
    assert isinstance(plan, Plan)
    assert [(p.audio, p.portrait, p.name) for p in plan.pairs] == [("alice.wav", "alice.jpg", "alice")]


def test_loose_file_without_partner_waits_then_is_rejected_after_timeout():
    assert isinstance(plan_loose([f("bob.wav")], timed_out=False), Wait)
    rejected = plan_loose([f("bob.wav")], timed_out=True)
    assert isinstance(rejected, Rejection)
    assert "no portrait" in rejected.problems[0].reason and "bob" in rejected.problems[0].hint


def test_loose_unsupported_file_is_rejected_at_once():
    rejected = plan_loose([f("notes.docx")], timed_out=False)
    assert isinstance(rejected, Rejection) and "not an audio, script or portrait" in rejected.problems[0].reason


def test_folder_one_audio_many_portraits_makes_one_video_per_portrait():
    plan = folder(["voice.wav", "anna.jpg", "ben.png", "carl.mp4"])
    assert isinstance(plan, Plan)
    assert sorted(p.name for p in plan.pairs) == ["anna", "ben", "carl"]
    assert {p.audio for p in plan.pairs} == {"batch/voice.wav"}


def test_folder_many_audios_one_portrait_makes_one_video_per_audio():
    plan = folder(["a.wav", "b.mp3", "face.jpg"])
    assert isinstance(plan, Plan) and sorted(p.name for p in plan.pairs) == ["a", "b"]


def test_folder_many_to_many_without_manifest_is_rejected_with_a_hint():
    rejected = folder(["a.wav", "b.wav", "x.jpg", "y.jpg"])
    assert isinstance(rejected, Rejection)
    assert "job.yaml" in rejected.problems[0].hint


def test_folder_without_audio_waits_for_it():
    assert isinstance(folder(["x.jpg"]), Wait)
    assert isinstance(folder(["x.jpg"], timed_out=True), Rejection)


@pytest.mark.parametrize("names, reason, hint", [
    (["x.jpg"], "folder has no audio file or script (.txt)", "add an audio file or script (.txt) to the folder"),
    (["x.wav"], "folder has no portrait (photo or video)", "add a portrait (photo or video) to the folder")])
def test_a_folder_missing_a_partner_says_which_in_plain_words(names, reason, hint):
    problem = folder(names).problem
    assert problem.reason == reason and problem.hint.startswith(hint)


def test_manifest_lists_pairs_and_options():
    manifest = "name: promo\npreset: 720p\npairs:\n  - {audio: a.wav, portrait: x.jpg, name: first}\n" \
               "  - {audio: b.wav, portrait: y.jpg}\n"
    plan = folder(["a.wav", "b.wav", "x.jpg", "y.jpg"], manifest)
    assert isinstance(plan, Plan)
    assert plan.name_hint == "promo" and plan.preset == "720p"
    assert [p.name for p in plan.pairs] == ["first", "y-b"]


def test_manifest_face_box_reaches_the_engine_options():
    plan = folder(["a.wav", "x.jpg"], "options: {quality: 2}\nface_box: [40, 200, 60, 220]\n")
    assert isinstance(plan, Plan)
    assert plan.options == {"quality": 2, "face_box": [40, 200, 60, 220]}
    assert plan.face_box == (40, 200, 60, 220)


@pytest.mark.parametrize("box, words", [
    ("[40, 200, 60]", "face_box"),
    ("[40.5, 200, 60, 220]", "integer"),
    ("['40', 200, 60, 220]", "integer"),
    ("[200, 40, 60, 220]", "top above bottom"),
    ("[40, 200, -1, 220]", "none negative"),
])
def test_a_malformed_face_box_is_refused_naming_the_key(box, words):
    rejected = folder(["a.wav", "x.jpg"], f"face_box: {box}\n")
    assert isinstance(rejected, Rejection)
    assert "job.yaml: face_box" in rejected.problems[0].reason and words in rejected.problems[0].reason


def test_a_face_box_under_options_is_refused_so_it_is_always_checked():
    rejected = folder(["a.wav", "x.jpg"], "options: {face_box: [0, 10, 0, 10]}\n")
    assert isinstance(rejected, Rejection) and "top level" in rejected.problems[0].reason


def test_manifest_upload_false_keeps_the_job_local():
    assert folder(["a.wav", "x.jpg"], "upload: false\n").upload is False
    assert folder(["a.wav", "x.jpg"]).upload is True
    assert isinstance(folder(["a.wav", "x.jpg"], "upload: 'no'\n"), Rejection)


def test_manifest_path_escape_is_refused():
    rejected = folder(["a.wav", "x.jpg"], "pairs:\n  - {audio: ../../etc/passwd, portrait: x.jpg}\n")
    assert isinstance(rejected, Rejection)
    assert "not a file in this folder" in rejected.problems[0].reason


def test_invalid_manifest_yaml_is_refused_with_the_parse_error():
    rejected = folder(["a.wav", "x.jpg"], "pairs: [unclosed\n")
    assert isinstance(rejected, Rejection) and "not valid YAML" in rejected.problems[0].reason


def test_manifest_unknown_key_and_unknown_engine_are_refused():
    assert "unknown key" in folder(["a.wav", "x.jpg"], "pairz: []\n").problems[0].reason
    assert "engine 'magic'" in folder(["a.wav", "x.jpg"], "engine: magic\n").problems[0].reason


def test_symlink_and_fifo_in_a_folder_are_refused():
    links = plan_folder("b", [f("b/a.wav"), f("b/x.jpg", stat.S_IFLNK | 0o777)], None, False, ENGINES, PRESETS)
    assert isinstance(links, Rejection) and "symbolic link" in links.problems[0].reason
    fifo = plan_loose([f("p.wav", stat.S_IFIFO | 0o644)], timed_out=False)
    assert isinstance(fifo, Rejection) and "not a regular file" in fifo.problems[0].reason


def test_non_utf8_name_is_refused():
    bad = b"caf\xe9.wav".decode("utf-8", "surrogateescape")
    rejected = plan_loose([f(bad)], timed_out=False)
    assert isinstance(rejected, Rejection) and "not valid UTF-8" in rejected.problems[0].reason
    assert rejected.problems[0].file == "caf\\xe9.wav"


def test_safe_name_keeps_letters_and_drops_path_tricks():
    assert safe_name("../../etc") == "etc"
    assert safe_name("Ünïcode name") == "Ünïcode name"
    assert safe_name("...") == "job"


def test_manifest_sets_the_job_priority_and_refuses_an_unknown_one():
    assert folder(["a.wav", "x.jpg"], "priority: high\n").priority == "high"
    assert folder(["a.wav", "x.jpg"]).priority == "normal"
    refused = folder(["a.wav", "x.jpg"], "priority: urgent\n")
    assert isinstance(refused, Rejection) and "priority" in refused.problems[0].reason
    assert refused.problems[0].kind.value == "bad_input"
