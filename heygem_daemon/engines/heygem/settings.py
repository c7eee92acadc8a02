"""`engines.heygem` in config.yaml: the services (one per GPU, each with the host folder its container
sees as /code/data) and the limits that tell a slow render from a hung one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from heygem_daemon.engines.base import EngineSettings

STALL_REMOVED = (
    "removed: a render holds its progress at 20 % for its whole length, so an unchanged progress says "
    "nothing. Delete the key; a render is now bounded by render_timeout_factor x audio seconds + "
    "render_timeout_base, and a hung engine by workers.stall_seconds (no answer from the service)"
)


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8383")
    return url.rstrip("/")


def _absolute(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_absolute():
        raise ValueError(f"{path} is relative; give the absolute host folder mounted as /code/data")
    return path


class ServiceEntry(BaseModel):
    """One service in the long form: `{url: http://gpu2:8383, data_dir: /mnt/gpu2/face2face}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    data_dir: Path | None = Field(None, description="its /code/data as mounted here; default engines.heygem.data_dir")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url)

    @field_validator("data_dir")
    @classmethod
    def _dir(cls, path: Path | None) -> Path | None:
        return None if path is None else _absolute(path)


@dataclass(frozen=True)
class Endpoint:
    """A service and the host folder its container sees as /code/data."""

    url: str
    data_dir: Path

    @property
    def temp(self) -> Path:
        return self.data_dir / "temp"


class HeygemSettings(EngineSettings):
    services: list[ServiceEntry] = Field(
        [ServiceEntry(url="http://127.0.0.1:8383")], min_length=1,
        description="base URLs (or {url, data_dir}), one per GPU; each runs one job at a time")
    data_dir: Path | None = Field(None, validate_default=True,
                                  description="host folder mounted as the container's /code/data")
    poll_interval: float = Field(
        2.0, gt=0.0, description="seconds between queries of a render; a down service is asked again this often")
    render_timeout_factor: float = Field(
        10.0, gt=0.0, description="a render may take this many times the audio's length (GPUs render at 1:4..1:8)")
    render_timeout_base: float = Field(600.0, ge=0.0, description="plus this many seconds (model load, conversion)")
    busy_alert_seconds: float = Field(
        1800.0, gt=0.0, description="busy with a job not ours for this long: shown as wedged, operator alerted")
    request_timeout: float = Field(10.0, gt=0.0)
    busy_retry_interval: float = Field(5.0, gt=0.0, description="wait before asking a busy or down service again")
    chaofen: bool = Field(False, description="the service's super-resolution pass")
    watermark: bool = False
    stall_seconds: float | None = Field(None, description=STALL_REMOVED)

    @field_validator("services", mode="before")
    @classmethod
    def _plain_urls(cls, entries: Any) -> Any:
        """The short form, a list of URLs, is the long form without data_dir."""
        if isinstance(entries, list):
            return [{"url": e} if isinstance(e, str) else e for e in entries]
        return entries

    @field_validator("services")
    @classmethod
    def _once_each(cls, entries: list[ServiceEntry]) -> list[ServiceEntry]:
        urls = [e.url for e in entries]
        if len(set(urls)) != len(urls):
            raise ValueError("a service is listed twice; list each one once")
        return entries

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is not None:
            return _absolute(path)
        if any(e.data_dir is None for e in info.data.get("services", [])):
            raise ValueError("required (the host folder mounted as the container's /code/data), "
                             "unless every service gives its own data_dir")
        return None

    @field_validator("stall_seconds")
    @classmethod
    def _stall_removed(cls, value: float | None) -> None:
        raise ValueError(STALL_REMOVED)

    def endpoints(self) -> list[Endpoint]:
        # _data_dir made sure one of the two is set.
        return [Endpoint(e.url, e.data_dir or self.data_dir) for e in self.services]  # type: ignore[arg-type]

    def render_limit(self, audio_seconds: float) -> float:
        return self.render_timeout_factor * audio_seconds + self.render_timeout_base
