"""Load and validate the daemon's YAML config; every mistake becomes one line naming the key and the fix."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import EnvSettingsSource, SecretsSettingsSource
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "HEYGEM_"


class ConfigError(Exception):
    """A config problem a person must fix; the message is one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Folders(_Section):
    inbox: Path = Path("inbox")
    work: Path = Path("work")
    outputs: Path = Path("outputs")
    failed: Path = Path("failed")
    archive: Path = Path("archive")
    state: Path = Path("state")
    logs: Path = Path("logs")


DEFAULT_IGNORE = [
    "*.part", "*.tmp", "*.crdownload", "~$*", ".~lock*", "._*", ".DS_Store", "Thumbs.db", "desktop.ini",
]
# Names that mean "a program is still writing here": a folder holding one is not ready.
DEFAULT_PARTIAL = ["*.part", "*.tmp", "*.crdownload", ".~lock*", "~$*"]


class Watcher(_Section):
    mode: Literal["auto", "inotify", "polling"] = "auto"
    settle_seconds: float = Field(3.0, ge=0.0)
    poll_interval: float = Field(2.0, gt=0.0)
    rescan_seconds: float = Field(60.0, gt=0.0)
    pair_timeout: float = Field(600.0, ge=0.0)
    stalled_upload_seconds: float = Field(1800.0, ge=0.0)
    """A file the kernel says is still open for writing waits this long without new data, then is refused."""
    incomplete_grace_seconds: float = Field(60.0, ge=0.0)
    """A file that looks cut short is refused only once it has not changed for this long."""
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    partial: list[str] = Field(default_factory=lambda: list(DEFAULT_PARTIAL))
    ignore_hidden: bool = True
    probe_workers: int = Field(2, ge=1, le=32)


class Limits(_Section):
    min_audio_seconds: float = Field(0.3, ge=0.0)
    max_audio_seconds: float = Field(1800.0, gt=0.0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_video_pixels: int = Field(8_300_000, gt=0)
    max_portrait_seconds: float = Field(120.0, gt=0.0)
    max_file_mb: float = Field(4096.0, gt=0.0)
    max_script_chars: int = Field(20_000, gt=0, description="longest script (.txt) read out, in characters")


class Preset(_Section):
    height: int = Field(gt=0)
    fps: int = Field(gt=0, le=120)
    video_bitrate: int = Field(gt=0, description="bits per second")
    audio_bitrate: int = Field(128_000, gt=0)
    codec: Literal["h264", "hevc"] = Field("h264", description="hevc: about 40 % fewer bits for the same picture")

    @field_validator("height")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (H.264 and HEVC with yuv420p need even dimensions)")
        return v


# The bandwidth table we deliver to: H.264 where every player copes, HEVC where 1080p would cost too much.
DEFAULT_PRESETS = {
    "480p": Preset(height=480, fps=25, video_bitrate=600_000, audio_bitrate=96_000),
    "720p": Preset(height=720, fps=25, video_bitrate=1_500_000),
    "1080p": Preset(height=1080, fps=30, video_bitrate=2_500_000, audio_bitrate=160_000, codec="hevc"),
}


class EngineChoice(_Section):
    name: str = "preview"
    preset: str = "480p"
    x264_preset: str = Field("veryfast", description="speed/size trade-off of libx264 and libx265 (same names)")


class Speech(_Section):
    """How scripts (.txt inputs) become the audio a video is rendered from (heygem_daemon/speech/)."""

    engine: str = Field("espeak", description="the speech engine: espeak (offline, Debian's espeak-ng) | heygem-tts")
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="each speech engine's settings")
    part_chars: int = Field(300, ge=20, description="longest part spoken at once (a script goes by sentences)")
    pause_seconds: float = Field(0.3, ge=0.0, le=5.0, description="silence between two sentences")
    cache_days: float = Field(30.0, gt=0.0, description="spoken parts unused this long leave work/.speech-cache")
    ahead_slots: int = Field(1, ge=0, le=32, description="processes speaking queued scripts while the slots "
                             "render (0 = speech only when a render slot takes the task)")


class Remote(_Section):
    """Generation on other hosts (`heygem-daemon worker`), through Celery with a Redis broker."""

    broker_url: str = Field(..., description="redis://host:6379/0; the result backend is the same Redis")
    queues: dict[str, int] = Field(..., description="queue name: tasks kept in flight on it (its devices in all)")
    path_map: dict[str, str] = Field(default_factory=dict, description="daemon path prefix: the same folder "
                                     "as the workers mount it (the shared work/ and outputs/)")
    visibility_timeout_seconds: float = Field(
        43200.0, gt=0.0, description="Redis hands an unacknowledged task to another worker after this long: keep "
        "it above the longest render (a dead worker is noticed sooner, by workers.stall_seconds)")
    beat_seconds: float = Field(1.0, gt=0.0, description="how often a worker reports a running task's heartbeat")
    poll_seconds: float = Field(0.25, gt=0.0, description="how often the daemon reads the state of remote tasks")
    transfer: Literal["shared", "s3"] = Field(
        "shared", description="shared: workers read inputs and write videos through a folder every host mounts "
        "(path_map); s3: inputs travel as presigned links and the worker uploads the video to its final key")
    transfer_threads: int = Field(2, ge=1, le=16, description="transfer s3: inputs staged and videos downloaded "
                                  "at a time, beside the dispatch loop (which never waits for them)")

    @field_validator("broker_url")
    @classmethod
    def _redis(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ValueError("use a Redis URL: redis://host:6379/0 (rediss:// for TLS)")
        return v

    @field_validator("queues")
    @classmethod
    def _queues(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or any(n < 1 for n in v.values()):
            raise ValueError("name at least one queue with one or more tasks in flight, e.g. {gpu: 8}")
        return v


class Workers(_Section):
    devices: list[str] = Field(default_factory=lambda: ["cpu"])
    per_device: int = Field(1, ge=1, le=16)
    max_attempts: int = Field(3, ge=1)
    backoff_seconds: float = Field(10.0, ge=0.0)
    backoff_max_seconds: float = Field(600.0, ge=0.0)
    stall_seconds: float = Field(300.0, gt=0.0)
    outage_alert_seconds: float = Field(600.0, gt=0.0, description="alert the operator when tasks have "
                                        "waited this long for a dependency (engine service, disk space)")
    nice: int = Field(10, ge=0, le=19, description="CPU niceness of worker processes; keeps intake responsive")
    remote: Remote | None = None

    @model_validator(mode="after")
    def _somewhere_to_run(self) -> "Workers":
        if not self.devices and self.remote is None:
            raise ValueError("devices: list at least one device, e.g. [cpu] or [cuda:0] (or set workers.remote)")
        if self.remote and self.remote.visibility_timeout_seconds <= self.stall_seconds:
            # Redis would hand a running task to a second worker before the daemon even missed its beats.
            raise ValueError("remote.visibility_timeout_seconds must be above stall_seconds, and above the "
                             "longest render (README \"Many GPU hosts\")")
        return self

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        for d in v:
            if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"unknown device {d!r}; use cpu, cuda or cuda:N")
        return v


class Dedupe(_Section):
    window_hours: float = Field(24.0, ge=0.0)


# An allow-list entry: a scheme alone (every URL of it), or a scheme and one host (and port).
_JOB_TARGET = re.compile(r"[a-z][a-z0-9+.-]*(://[a-z0-9.\-]+(:\d{1,5})?|://\[[0-9a-f:.]+\](:\d{1,5})?)?")


class Notify(_Section):
    """Chat notifications through apprise. URLs hold tokens: prefer urls_file or HEYGEM_NOTIFY__URLS."""

    urls: list[str] = Field(default_factory=list)
    operator_urls: list[str] | None = None
    urls_file: Path | None = None
    title_prefix: str = "[heygem] "
    retry_base_seconds: float = Field(10.0, gt=0.0)
    retry_max_seconds: float = Field(600.0, gt=0.0)
    max_age_hours: float = Field(24.0, gt=0.0)
    alert_repeat_hours: float = Field(24.0, gt=0.0)
    job_targets: Literal["off"] | list[str] = Field(
        "off", description="chat targets job.yaml may name: off, or schemes (slack) and scheme://host[:port]")

    @field_validator("job_targets", mode="before")
    @classmethod
    def _job_targets_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false; from the environment a list arrives as one string.
        if v is False or v is None or v == "off":
            return "off"
        return v.split() if isinstance(v, str) else v

    @field_validator("job_targets")
    @classmethod
    def _job_target_entries(cls, v: Literal["off"] | list[str]) -> Literal["off"] | list[str]:
        for i, entry in enumerate([] if v == "off" else v):
            if not _JOB_TARGET.fullmatch(entry):
                raise ValueError(f"entry {i + 1} ({entry!r}) is neither a scheme (slack) nor scheme://host[:port] "
                                 "(json://chat.example.com); write schemes in lower case, no paths or tokens")
        return v

    @field_validator("urls", "operator_urls", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        # From the environment a list arrives as one string: split it on whitespace.
        return v.split() if isinstance(v, str) else v

    @field_validator("urls", "operator_urls")
    @classmethod
    def _url_shaped(cls, v: list[str] | None) -> list[str] | None:
        for i, url in enumerate(v or []):
            if "://" not in url:
                raise ValueError(f"entry {i + 1} is not a URL (apprise URLs look like slack://... or json://...)")
        return v


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    console: bool = True
    # stderr for systemd (the journal reads both); the container image sets stdout, where `docker logs` wants it.
    console_stream: Literal["stderr", "stdout"] = "stderr"


class Shutdown(_Section):
    drain_seconds: float = Field(600.0, ge=0.0)


class Cleanup(_Section):
    """Retentions and how often each sweep runs (an interval of 0 turns that sweep off)."""

    temp_hours: float = Field(6.0, gt=0.0)
    temp_every_hours: float = Field(1.0, ge=0.0)
    work_every_hours: float = Field(1.0, ge=0.0)
    archive_days: float = Field(30.0, gt=0.0)
    archive_every_hours: float = Field(24.0, ge=0.0)
    rows_days: float = Field(90.0, gt=0.0)
    failed_rows_days: float = Field(365.0, gt=0.0)
    rows_every_hours: float = Field(24.0, ge=0.0)
    outputs_days: float = Field(7.0, gt=0.0, description="uploaded videos kept locally this long")
    outputs_every_hours: float = Field(24.0, ge=0.0)
    zips_every_hours: float = Field(6.0, ge=0.0)
    stale_upload_hours: float = Field(24.0, gt=0.0)
    stale_uploads_every_hours: float = Field(6.0, ge=0.0)
    backup_every_hours: float = Field(24.0, ge=0.0, description="online copy of the database to state/heygem.db.bak")


class DiskGuard(_Section):
    min_free_gb: float = Field(2.0, ge=0.0)
    check_seconds: float = Field(10.0, gt=0.0)


class Metrics(_Section):
    port: int | None = Field(None, ge=1, le=65535)


MAX_LINK_EXPIRY_HOURS = 168  # SigV4 presigned URLs cannot outlive 7 days
KEY_FIELDS = ("date", "job", "token", "file")


class Lifecycle(_Section):
    """Bucket lifecycle rules applied at start-up, merged by ID with the rules already on the bucket."""

    prefix: str = ""
    whole_bucket: bool = Field(False, description="allow a rule over the whole bucket (no prefix): only for a "
                               "bucket that holds nothing but our objects")
    transition_ia_days: int | None = Field(None, ge=30, description="STANDARD_IA needs objects 30+ days old")
    expire_days: int | None = Field(None, ge=1)
    abort_incomplete_days: int | None = Field(None, ge=1)

    @property
    def wanted(self) -> bool:
        return any(v is not None for v in (self.transition_ia_days, self.expire_days, self.abort_incomplete_days))


class S3(_Section):
    """Upload target. Off until `bucket` is set; credentials come from boto3's chain or systemd credentials."""

    bucket: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    key_prefix: str = "{date}/{job}/{token}/{file}"
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    part_size_mb: int = Field(16, ge=5, le=5120, description="S3 refuses parts under 5 MiB (except the last)")
    max_concurrency: int = Field(3, ge=1, le=32, description="files uploaded at a time")
    part_concurrency: int = Field(4, ge=1, le=32, description="parts of one file in flight at a time")
    max_bandwidth_mb_s: float = Field(0.0, ge=0.0, description="0 means unlimited")
    link_expiry_hours: float = Field(24.0, gt=0.0)
    retry_seconds: float = Field(15.0, gt=0.0)
    retry_max_seconds: float = Field(600.0, gt=0.0)
    alert_retry_seconds: float = Field(900.0, gt=0.0)
    connect_timeout: float = Field(10.0, gt=0.0)
    read_timeout: float = Field(120.0, gt=0.0)
    lifecycle: Lifecycle = Lifecycle()

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)

    @field_validator("link_expiry_hours")
    @classmethod
    def _expiry(cls, v: float) -> float:
        if v > MAX_LINK_EXPIRY_HOURS:
            raise ValueError(f"is above {MAX_LINK_EXPIRY_HOURS} hours (7 days), the longest an S3 presigned link "
                             "can live; use 168 or less")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        # Without a scheme botocore dies at start with a traceback; say it here, where it is fixed.
        if v and not v.lower().startswith(("http://", "https://")):
            raise ValueError(f"{v!r} has no scheme; write it as http://{v} or https://{v}")
        return v or None

    @field_validator("key_prefix")
    @classmethod
    def _template(cls, v: str) -> str:
        used = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        unknown = used - set(KEY_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{date}} {{job}} {{token}} {{file}}")
        if not {"token", "file"} <= used:
            raise ValueError("must contain {token} (unguessable keys) and {file}, e.g. {date}/{job}/{token}/{file}")
        return v


class Delivery(_Section):
    adhoc_quiet_seconds: float = Field(60.0, ge=0.0, description="videos other tools leave in outputs/<folder>/ "
                                       "form one batch until the folder is quiet this long")
    zip_min_videos: int = Field(2, ge=1, description="a batch with fewer videos gets no zip (its link is enough)")


class WebUser(_Section):
    """A console user: the argon2 hash of her password (none with auth: proxy) and her role. In YAML either
    `alice: "$argon2id$..."` or `alice: {hash: "$argon2id$...", role: admin}`."""

    hash: str | None = Field(None, description="argon2 hash from `heygem-daemon web hash-password`")
    role: Literal["user", "admin"] = Field("user", description="user: cancel and retry the jobs she uploaded; "
                                           "admin: any job")

    @field_validator("hash")
    @classmethod
    def _argon2(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("$argon2"):
            raise ValueError("not an argon2 hash; make one with `heygem-daemon web hash-password` "
                             "(never write the password itself here)")
        return v


class Web(_Section):
    """The web console (`heygem-daemon web`): off by default; binds the loopback unless told otherwise.
    The session key is a secret: systemd credential `web-session-key` or $HEYGEM_WEB_SESSION_KEY."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=1, le=65535)
    auth: Literal["password", "proxy"] = "password"
    users: dict[str, WebUser] = Field(default_factory=dict, description="user: argon2 hash from "
                                      "`heygem-daemon web hash-password`, or {hash: ..., role: admin}")
    proxy_header: str = Field("X-Remote-User", description="with auth: proxy, the header naming the user")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses (or networks) of the reverse proxies whose X-Forwarded-For "
        "and X-Forwarded-Proto are believed; none by default, so every client is the address it connects from")
    secure_cookies: Literal["auto"] | bool = Field(
        "auto", description="Secure flag on the session cookie; auto: when the request came over HTTPS (TLS, or "
        "X-Forwarded-Proto: https from one of web.trusted_proxies)")
    max_upload_mb: float = Field(2048.0, gt=0.0, description="largest file one upload may be")
    max_files: int = Field(50, ge=2, le=1000, description="files in one job uploaded from the web")
    upload_expiry_hours: float = Field(24.0, gt=0.0, description="incomplete uploads are swept this long "
                                       "after their last byte")
    upload_idle_seconds: float = Field(60.0, gt=0.0, description="a PATCH whose body sends nothing this long "
                                       "is ended (its bytes kept): a client gone without closing its socket")
    uploads_every_hours: float = Field(1.0, ge=0.0, description="how often the cleanup sweeps expired uploads")
    login_attempts: int = Field(5, ge=1, description="failed logins from one address before each further try "
                                "waits (login_delay_seconds, doubling)")
    login_user_attempts: int = Field(20, ge=1, description="failed logins for one user from addresses she has "
                                     "not logged in from lately, before each further try waits")
    login_delay_seconds: float = Field(1.0, gt=0.0, description="the first wait after the free attempts; each "
                                       "further failure doubles it, up to half of login_window_seconds")
    login_window_seconds: float = Field(300.0, gt=0.0, description="failures are forgotten after this long "
                                        "without one")
    page_size: int = Field(50, ge=5, le=500)
    api_requests_per_minute: int = Field(120, ge=1, description="requests one API token may make per minute "
                                         "(more are answered 429 with Retry-After)")
    api_multipart_mb: float = Field(50.0, gt=0.0, description="largest multipart request of the API (files "
                                    "sent with the job); larger files go through tus uploads")
    api_s3_input_prefix: str = Field("", description="object keys under this prefix of s3.bucket may be a "
                                     "job's inputs (API s3_keys, relative to it); empty: off")
    webhook_allow: list[str] = Field(default_factory=list, description="networks (CIDR) or host names a webhook may "
                                     "reach although private, loopback, link-local or reserved; none by default")
    webhook_secret_overlap_hours: float = Field(24.0, ge=0.0, description="after `web token rotate-secret`, the "
                                                "previous secret signs webhooks too (a second v1=) this long")

    @field_validator("users", mode="before")
    @classmethod
    def _hash_only(cls, v: Any) -> Any:
        # `alice: "$argon2id$..."`, the short form, is a user with that hash and no role.
        return {user: {"hash": u} if isinstance(u, str) else u for user, u in v.items()} if isinstance(v, dict) else v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for proxy in v:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/24)") from None
        return v

    @model_validator(mode="after")
    def _passwords(self) -> "Web":
        missing = [user for user, u in self.users.items() if u.hash is None]
        if self.auth == "password" and missing:
            raise ValueError(f"users {', '.join(missing)} have no password hash; with auth: password each needs "
                             "one (`heygem-daemon web hash-password`)")
        return self

    @model_validator(mode="after")
    def _proxy_behind_loopback(self) -> "Web":
        # Anyone who reaches the port could name any user in the header: only the proxy on this host may.
        if self.auth == "proxy" and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"auth: proxy trusts the {self.proxy_header} header, so host must be 127.0.0.1 "
                             f"(got {self.host}); let the reverse proxy on this machine face the network")
        return self

    def password_hashes(self) -> dict[str, str]:
        return {user: u.hash for user, u in self.users.items() if u.hash}

    def is_admin(self, user: str | None) -> bool:
        known = self.users.get(user or "")
        return known is not None and known.role == "admin"


class Config(_Section):
    base_dir: Path = Path(".")
    folders: Folders = Folders()
    watcher: Watcher = Watcher()
    limits: Limits = Limits()
    presets: dict[str, Preset] = Field(default_factory=lambda: dict(DEFAULT_PRESETS))
    engine: EngineChoice = EngineChoice()
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    speech: Speech = Speech()
    workers: Workers = Workers()
    dedupe: Dedupe = Dedupe()
    notify: Notify = Notify()
    logging: Logging = Logging()
    shutdown: Shutdown = Shutdown()
    cleanup: Cleanup = Cleanup()
    disk_guard: DiskGuard = DiskGuard()
    metrics: Metrics = Metrics()
    s3: S3 = S3()
    delivery: Delivery = Delivery()
    web: Web = Web()

    @model_validator(mode="after")
    def _s3_for_remote_transfer(self) -> "Config":
        if self.workers.remote and self.workers.remote.transfer == "s3" and not self.s3.enabled:
            raise ValueError("workers.remote.transfer: s3 needs the s3 section (s3.bucket, and s3.endpoint_url "
                             "unless AWS): set it on the daemon and on every worker host, or use transfer: shared")
        return self

    @model_validator(mode="after")
    def _preset_known(self) -> "Config":
        if self.engine.preset not in self.presets:
            raise ValueError(
                f"engine.preset {self.engine.preset!r} is not defined; pick one of {sorted(self.presets)}"
            )
        return self

    def folder(self, key: str) -> Path:
        """Absolute path of a configured folder (relative ones hang off base_dir)."""
        p = getattr(self.folders, key)
        return p if p.is_absolute() else (self.base_dir / p)

    def preset(self, name: str | None = None) -> Preset:
        return self.presets[name or self.engine.preset]


def _yaml_value(value: Any) -> Any:
    """Override values are read as YAML, like the file ("7.5", "true", "null", "[a, b]"); else kept as text."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


class _YamlValues:
    """Override values are read as YAML (lists, numbers, null), like the file they override."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        return _yaml_value(value)


class _EnvOverrides(_YamlValues, EnvSettingsSource):
    """HEYGEM_SECTION__KEY=value (pydantic-settings, env_nested_delimiter "__") from the given environment."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._environ = environ
        super().__init__(Config, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__",  # type: ignore[arg-type]
                         env_parse_none_str="null")

    def _load_env_vars(self) -> Any:
        return parse_env_vars(self._environ, False, False, "null")


class _CredentialOverrides(_YamlValues, SecretsSettingsSource):
    """systemd credentials (`LoadCredential=heygem_s3:/etc/heygem/credentials/s3.yaml`): a file named
    heygem_<section> under $CREDENTIALS_DIRECTORY holds YAML keys of that section, readable by this service only."""

    def __init__(self, folder: str) -> None:
        super().__init__(Config, secrets_dir=folder, case_sensitive=False, env_prefix=ENV_PREFIX.lower())  # type: ignore[arg-type]


def _overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Credentials over the file, environment over both."""
    folder = environ.get("CREDENTIALS_DIRECTORY")
    out: dict[str, Any] = {}
    try:
        if folder and Path(folder).is_dir():
            out = _merge(out, _CredentialOverrides(folder)())
        out = _merge(out, _EnvOverrides(environ)())
    except SettingsError as exc:
        raise ConfigError(f"{ENV_PREFIX}* override: {exc}") from None
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: ErrorDetails, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
        return f"{source}: {key}: unknown key; {fix}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{source}: {key}: {msg}{shown}"


def _parse(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e, source) for e in exc.errors())) from None


def _prepare_folders(cfg: Config) -> None:
    for key in Folders.model_fields:
        path = cfg.folder(key)
        if path.is_dir():
            continue
        if path.exists():
            raise ConfigError(f"folders.{key}: {path} exists but is not a folder; point it at a folder")
        if not path.parent.is_dir():
            raise ConfigError(
                f"folders.{key}: {path.parent} does not exist; create it (or mount the share) or fix the path"
            )
        # Two processes starting at once (the daemon and a worker, or a restart racing its predecessor) may
        # both find the folder missing: the second one's mkdir must not fail on the first one's folder.
        path.mkdir(mode=0o775, exist_ok=True)


def load_config(path: Path | None, environ: dict[str, str] | None = None, prepare: bool = True) -> Config:
    """Read YAML (or embedded defaults when path is None), apply env overrides, validate, make folders."""
    environ = dict(os.environ) if environ is None else environ
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config ({exc.strerror}); check the path") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (folders:, watcher:, ...)")
        data = loaded or {}
    data = _merge(data, _overrides(environ))
    cfg = _parse(data, source)
    anchor = Path(path).resolve().parent if path else Path.cwd()
    base = cfg.base_dir if cfg.base_dir.is_absolute() else (anchor / cfg.base_dir)
    cfg = cfg.model_copy(update={"base_dir": base.resolve()})
    if prepare:
        if not cfg.base_dir.is_dir():
            raise ConfigError(f"base_dir: {cfg.base_dir} does not exist; create it or fix the path")
        _prepare_folders(cfg)
    return cfg
