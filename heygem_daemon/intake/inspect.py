"""Inspect a planned job's inputs in a child process: decode-check each file and hash it.

Decoding untrusted media runs in a process pool so that a crashing decoder costs a child, not the daemon.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

from heygem_daemon.config import Limits
from heygem_daemon.fs.files import file_owner, sha256_file
from heygem_daemon.failures import Problem
from heygem_daemon.media.face_spec import FaceEdges, FaceRule
from heygem_daemon.proc import die_with_parent


@dataclass
class Inspection:
    problems: list[Problem] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    """Inputs refused for what a file still arriving looks like too (empty, cut short, undecodable)."""
    digests: dict[str, str] = field(default_factory=dict)
    owner: str | None = None


_Key = tuple[str, FaceRule, Limits, "FaceEdges | None"]


class _PassedCache:
    """Content that already passed a probe in this process: batches reuse one portrait for many jobs,
    and a face detection costs tens of milliseconds while hashing a photo costs well under one."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[_Key, None] = OrderedDict()

    def __contains__(self, key: _Key) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def add(self, key: _Key) -> None:
        self._seen[key] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)


_passed = _PassedCache()


def inspect_inputs(inbox: str, rels: list[str], limits: Limits, need_face: FaceRule,
                   face_box: FaceEdges | None = None) -> Inspection:
    from heygem_daemon.intake.probe import ProbeError, probe_input

    result = Inspection()
    for rel in rels:
        path = Path(inbox) / rel
        try:
            digest = sha256_file(path) if path.is_file() and not path.is_symlink() else ""
            key = (digest, need_face, limits, face_box)
            if not digest or key not in _passed:
                probe_input(path, limits, need_face, face_box)
                _passed.add(key)
            result.digests[rel] = digest
        except ProbeError as exc:
            result.problems.append(Problem.of_input(rel, exc.reason, exc.hint))
            if exc.incomplete:
                result.incomplete.append(rel)
        except OSError as exc:
            result.problems.append(Problem.of_input(rel, f"cannot be read ({exc.strerror})",
                                                    "check the file's permissions and drop it again"))
    if rels:
        result.owner = file_owner(Path(inbox) / rels[0])
    return result


class Inspector:
    """A small spawn-context process pool that survives a child dying mid-decode."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.generation = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def _renew(self, generation: int) -> None:
        if generation == self.generation:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            self.generation += 1

    def submit(self, inbox: Path, rels: list[str], limits: Limits, need_face: FaceRule,
               face_box: FaceEdges | None = None) -> tuple[Future[Inspection], int]:
        job = partial(inspect_inputs, str(inbox), rels, limits, need_face, face_box)
        try:
            return self._pool.submit(job), self.generation
        except BrokenProcessPool:
            self._renew(self.generation)
            return self._pool.submit(job), self.generation

    def outcome(self, fut: Future[Inspection], generation: int) -> Inspection | None:
        """The inspection, or None when the pool broke (a child died): the caller may try once more."""
        try:
            return fut.result()
        except BrokenProcessPool:
            self._renew(generation)
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
