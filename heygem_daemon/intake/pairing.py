"""Turn what people dropped into job plans, following the pairing rules people were promised.

1. Folder `inbox/<name>/`: 1 audio + N portraits, or N audios + 1 portrait; anything else needs job.yaml.
2. Loose pair: `inbox/alice.wav` + `inbox/alice.jpg` (same stem, any case) -> one video.
A script (`.txt`, read out by the speech engine) stands wherever an audio file may.
3. job.yaml sets per-job options (name, engine, preset, priority, options, notify, upload, face_box) and may
   list pairs explicitly.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from heygem_daemon.failures import Problem
from heygem_daemon.fs.ops import display_name
from heygem_daemon.media.face_spec import FaceEdges
from heygem_daemon.media.kinds import (AUDIO_EXTS, IMAGE_EXTS, SCRIPT_EXTS, SPEECH_KINDS, VIDEO_EXTS, MediaKind,
                                       kind_of)

MANIFEST_NAMES = ("job.yaml", "job.yml")
FACE_BOX = "face_box"
"""Key in a job's engine options: where engines that find faces themselves (wav2lip) find it instead."""
READY_MARKER = ".ready"
MAX_MANIFEST_BYTES = 64 * 1024
Priority = Literal["high", "normal", "low"]
SUPPORTED = ", ".join(sorted(AUDIO_EXTS | SCRIPT_EXTS | IMAGE_EXTS | VIDEO_EXTS))


@dataclass(frozen=True)
class FileInfo:
    rel: str
    """Path relative to the inbox, e.g. `alice.wav` or `promo/anna.jpg`."""
    size: int
    mtime_ns: int
    mode: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name


@dataclass(frozen=True)
class Pair:
    audio: str
    """The sound: an audio file, or a script the speech engine reads out."""
    portrait: str
    name: str


@dataclass
class Plan:
    """A complete job, ready to be probed and claimed."""

    name_hint: str
    sources: list[str]
    """Top-level inbox entries this job consumes (one folder, or the loose files)."""
    pairs: list[Pair]
    engine: str | None = None
    preset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notify: list[str] | None = None
    """Chat targets for this job instead of notify.urls ([] = none); None = the configured ones."""
    upload: bool = True
    """False (job.yaml `upload: false`): the videos stay in outputs/, even when S3 is configured."""
    priority: Priority = "normal"
    """Which jobs' tasks the slots take first; within a priority, jobs take turns."""
    speech: dict[str, Any] | None = None
    """job.yaml `speech:`: the speech engine (`engine:`) and its settings for this job's scripts."""

    @property
    def inputs(self) -> list[str]:
        return sorted({p.audio for p in self.pairs} | {p.portrait for p in self.pairs})

    @property
    def face_box(self) -> FaceEdges | None:
        edges = self.options.get(FACE_BOX)
        return tuple(edges) if edges is not None else None  # type: ignore[return-value]


@dataclass
class Rejection:
    name_hint: str
    sources: list[str]
    problems: list[Problem]
    notify: list[str] | None = None


@dataclass
class Wait:
    """Not a job yet: a partner may still arrive. `problem` is what gets reported if it never does."""

    problem: Problem


Outcome = Plan | Rejection | Wait


class PairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio: str | None = None
    script: str | None = None
    portrait: str
    name: str | None = None

    @model_validator(mode="after")
    def _one_sound(self) -> "PairSpec":
        if (self.audio is None) == (self.script is None):
            raise ValueError("give each pair either audio: (a sound file) or script: (a .txt file), not both")
        return self

    @property
    def sound(self) -> str:
        return self.audio if self.audio is not None else self.script  # type: ignore[return-value]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    engine: str | None = None
    preset: str | None = None
    options: dict[str, Any] = {}
    pairs: list[PairSpec] | None = None
    notify: list[str] | Literal[False] | None = None
    face_box: tuple[StrictInt, StrictInt, StrictInt, StrictInt] | None = None
    upload: StrictBool = True
    priority: Priority = "normal"
    speech: dict[str, Any] | None = None

    @field_validator("speech")
    @classmethod
    def _speech(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("engine", ""), str):
            raise ValueError("engine: the name of a speech engine (espeak, heygem-tts, command)")
        return v

    @field_validator("face_box")
    @classmethod
    def _edges(cls, v: FaceEdges | None) -> FaceEdges | None:
        if v is not None and (min(v) < 0 or v[0] >= v[1] or v[2] >= v[3]):
            raise ValueError("[top, bottom, left, right] in pixels of the portrait: top above bottom, "
                             "left of right, none negative")
        return v

    @field_validator("options")
    @classmethod
    def _no_box_inside(cls, v: dict[str, Any]) -> dict[str, Any]:
        if FACE_BOX in v:
            raise ValueError("face_box goes at the top level of job.yaml, not under options")
        return v

    def engine_options(self) -> dict[str, Any]:
        """options, plus the face box (checked against each portrait at intake) for the engine."""
        return {**self.options, FACE_BOX: list(self.face_box)} if self.face_box else dict(self.options)
    @field_validator("notify")
    @classmethod
    def _urls(cls, v: list[str] | Literal[False] | None) -> list[str] | Literal[False] | None:
        if v and any("://" not in u for u in v):
            raise ValueError("list apprise URLs (slack://..., json://...) or write false to send nothing")
        return v

    def notify_urls(self) -> list[str] | None:
        return [] if self.notify is False else self.notify


def manifest_notify(folder: Path) -> list[str]:
    """The notify URLs of the job.yaml in a claimed job's folder (work/, archive/ or failed/), [] if none.

    The store keeps only digests of per-job chat targets; this is where the sender finds the URLs."""
    for name in MANIFEST_NAMES:
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as fh:
            try:
                data = yaml.safe_load(fh.read(MAX_MANIFEST_BYTES).decode("utf-8"))
            except (UnicodeDecodeError, yaml.YAMLError):
                return []
        notify = data.get("notify") if isinstance(data, dict) else None
        return [u for u in notify if isinstance(u, str)] if isinstance(notify, list) else []
    return []


def safe_name(text: str, fallback: str = "job") -> str:
    """A folder/file name that is safe on every filesystem and shell: letters, digits, `-_.` and spaces."""
    text = display_name(text)
    cleaned = re.sub(r"[^\w.\- ]+", "_", text).strip(" ._")[:80]
    return cleaned or fallback


def entry_problem(info: FileInfo) -> Problem | None:
    """Things no job may contain, whatever the pairing: links, special files, undecodable names."""
    shown = display_name(info.rel)
    if stat.S_ISLNK(info.mode):
        return Problem.of_input(shown, "is a symbolic link; the daemon never follows links out of the inbox",
                                "copy the real file into the inbox instead of linking to it")
    if stat.S_ISDIR(info.mode):
        return Problem.of_input(shown, "is a folder inside a job folder; nested folders are not supported",
                                "put all files of a job directly in one folder")
    if not stat.S_ISREG(info.mode):
        return Problem.of_input(shown, "is not a regular file (a pipe, socket or device)",
                                "drop ordinary audio, script (.txt) and image/video files only")
    if shown != info.rel:
        return Problem.of_input(shown, "file name is not valid UTF-8",
                                "rename the file using plain letters and digits and drop it again")
    return None


def _unsupported(info: FileInfo) -> Problem:
    return Problem.of_input(info.rel, f"is not an audio, script or portrait file (supported: {SUPPORTED})",
                            "remove it or convert it to a supported format")


def plan_loose(group: list[FileInfo], timed_out: bool) -> Outcome:
    """Top-level files sharing one stem: exactly one audio and one portrait make a job."""
    stem = PurePosixPath(group[0].rel).stem
    sources = sorted(f.rel for f in group)
    bad = [p for p in (entry_problem(f) for f in group) if p]
    if bad:
        return Rejection(safe_name(stem), sources, bad)
    others = [f for f in group if kind_of(f.name) is MediaKind.OTHER]
    if others:
        return Rejection(safe_name(stem), sources, [_unsupported(f) for f in others])
    audios = [f for f in group if kind_of(f.name) in SPEECH_KINDS]
    portraits = [f for f in group if f not in audios]
    if len(audios) > 1 or len(portraits) > 1:
        names = ", ".join(sources)
        return Rejection(safe_name(stem), sources, [Problem.of_input(
            names, f"several files share the name {stem!r} ({names}); a loose pair is one audio (or script) + "
            "one portrait",
            "keep one audio and one portrait with that name, or put them in a folder with a job.yaml")])
    if audios and portraits:
        return Plan(safe_name(stem), sources, [Pair(audios[0].rel, portraits[0].rel, safe_name(stem))])
    lonely = group[0]
    missing = "portrait (.jpg, .png, .mp4 ...)" if audios else "audio file (.wav, .mp3 ...) or script (.txt)"
    problem = Problem.of_input(lonely.rel, f"no {missing} named {stem!r} arrived to pair with it",
                               f"drop a {missing.split(' (')[0]} called {stem}.<ext> next to it, "
                               "or put both files in a folder")
    return Rejection(safe_name(stem), sources, [problem]) if timed_out else Wait(problem)


def plan_folder(folder: str, files: list[FileInfo], manifest: bytes | None, timed_out: bool,
                engines: set[str], presets: set[str]) -> Outcome:
    """A folder job. `files` excludes ignored names, the manifest and the ready marker."""
    hint_name = safe_name(folder)
    bad = [p for p in (entry_problem(f) for f in files) if p]
    if bad:
        return Rejection(hint_name, [folder], bad)
    spec = Manifest()
    if manifest is not None:
        parsed = _parse_manifest(folder, manifest, engines, presets)
        if isinstance(parsed, Problem):
            return Rejection(hint_name, [folder], [parsed])
        spec = parsed
    name = safe_name(spec.name) if spec.name else hint_name
    outcome: list[Pair] | Problem | Wait
    if spec.pairs is not None:
        outcome = _explicit_pairs(folder, files, spec.pairs)
    else:
        outcome = implicit_pairs(folder, files)
    if isinstance(outcome, Problem):
        return Rejection(name, [folder], [outcome], spec.notify_urls())
    if isinstance(outcome, Wait):
        return Rejection(name, [folder], [outcome.problem], spec.notify_urls()) if timed_out else outcome
    return Plan(name, [folder], outcome, spec.engine, spec.preset, spec.engine_options(), spec.notify_urls(),
                spec.upload, spec.priority, spec.speech or None)


def _parse_manifest(folder: str, raw: bytes, engines: set[str], presets: set[str]) -> Manifest | Problem:
    where = f"{folder}/job.yaml"
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Problem.of_input(where, f"job.yaml is not valid YAML ({first})",
                       "fix the syntax (a YAML checker helps) or delete job.yaml to use the default pairing")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return Problem.of_input(where, "job.yaml must be a mapping (name:, engine:, preset:, pairs: ...)",
                       "see the README section on job.yaml")
    try:
        spec = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        return Problem.of_input(where, f"job.yaml: {key}: {msg}",
                                "allowed keys: name, engine, preset, priority (high, normal, low), options, notify,"
                                " upload, face_box, speech (engine and its settings), pairs (audio or script,"
                                " portrait, name)")
    if spec.engine is not None and spec.engine not in engines:
        return Problem.of_input(where, f"job.yaml: engine {spec.engine!r} is not available",
                       f"use one of: {', '.join(sorted(engines))}")
    if spec.preset is not None and spec.preset not in presets:
        return Problem.of_input(where, f"job.yaml: preset {spec.preset!r} is not defined",
                       f"use one of: {', '.join(sorted(presets))}")
    return spec


def _member(folder: str, ref: str, by_name: dict[str, FileInfo]) -> FileInfo | Problem:
    """A file named by job.yaml: a plain name inside the folder, never a path out of it."""
    p = PurePosixPath(ref)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or "\\" in ref:
        return Problem.of_input(f"{folder}/job.yaml", f"job.yaml names {ref!r}, which is not a file in this folder",
                       "list plain file names from the job folder, without paths")
    info = by_name.get(ref)
    if info is None:
        return Problem.of_input(f"{folder}/job.yaml", f"job.yaml names {ref!r}, but the folder has no such file",
                       "check the spelling or add the file")
    return info


def _explicit_pairs(folder: str, files: list[FileInfo], specs: list[PairSpec]) -> list[Pair] | Problem:
    if not specs:
        return Problem.of_input(f"{folder}/job.yaml", "job.yaml has an empty pairs list", "list at least one pair")
    by_name = {f.name: f for f in files}
    pairs: list[Pair] = []
    for spec in specs:
        audio = _member(folder, spec.sound, by_name)
        portrait = _member(folder, spec.portrait, by_name)
        for got in (audio, portrait):
            if isinstance(got, Problem):
                return got
        assert isinstance(audio, FileInfo) and isinstance(portrait, FileInfo)
        wanted, what = (MediaKind.AUDIO, "an audio") if spec.audio is not None else (MediaKind.SCRIPT, "a .txt")
        if kind_of(audio.name) is not wanted:
            return Problem.of_input(audio.rel, f"listed as {wanted.value} but is not {what} file",
                                    f"supported: {SUPPORTED}")
        if kind_of(portrait.name) not in (MediaKind.IMAGE, MediaKind.VIDEO):
            return Problem.of_input(portrait.rel, "listed as portrait but is not an image or video",
                           f"supported: {SUPPORTED}")
        name = safe_name(spec.name or f"{PurePosixPath(portrait.name).stem}-{PurePosixPath(audio.name).stem}")
        pairs.append(Pair(audio.rel, portrait.rel, name))
    return _unique_names(folder, pairs)


def implicit_pairs(folder: str, files: list[FileInfo]) -> list[Pair] | Problem | Wait:
    """Rule 1, for a folder without a pairs list: one audio + N portraits, or N audios + 1 portrait, each
    video named after the file that varies. The web console checks its uploads with it too."""
    others = [f for f in files if kind_of(f.name) is MediaKind.OTHER]
    if others:
        return _unsupported(others[0])
    audios = sorted((f for f in files if kind_of(f.name) in SPEECH_KINDS), key=lambda f: f.rel)
    portraits = sorted((f for f in files if f not in audios), key=lambda f: f.rel)
    if len(audios) == 1 and portraits:
        pairs = [Pair(audios[0].rel, p.rel, safe_name(PurePosixPath(p.name).stem)) for p in portraits]
    elif len(portraits) == 1 and audios:
        pairs = [Pair(a.rel, portraits[0].rel, safe_name(PurePosixPath(a.name).stem)) for a in audios]
    elif not audios or not portraits:
        missing = "audio file or script (.txt)" if not audios else "portrait (photo or video)"
        return Wait(Problem.of_input(folder, f"folder has no {missing}",
                            f"add {'an' if not audios else 'a'} {missing} to the folder; a job needs both"))
    else:
        return Problem.of_input(folder, f"folder has {len(audios)} audio files and {len(portraits)} portraits, "
                               "so it is not clear which goes with which",
                       "use one audio with many portraits, many audios with one portrait, "
                       "or add a job.yaml listing the pairs")
    return _unique_names(folder, pairs)


def _unique_names(folder: str, pairs: list[Pair]) -> list[Pair] | Problem:
    seen: set[str] = set()
    for p in pairs:
        if p.name.casefold() in seen:
            return Problem.of_input(folder, f"two videos would both be called {p.name!r}",
                           "give the files different names, or set distinct names in job.yaml")
        seen.add(p.name.casefold())
    return pairs
