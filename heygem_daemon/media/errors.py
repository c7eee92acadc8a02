"""The one exception media helpers raise for inputs they cannot use."""

from __future__ import annotations


class MediaError(Exception):
    """A file cannot be decoded or used; `reason` says what is wrong, `hint` what a person can do."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
