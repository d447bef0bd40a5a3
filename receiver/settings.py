"""Every tunable of the service, read once from the environment and `.env`.

`load_settings()` is the only way in: it validates, fills derived defaults and,
when `CALLBACK_SECRET`, `ADMIN_TOKEN` or `EVENT_WEBHOOK_SECRET` is unset, takes them
from a 0600 file in the data directory (generating them on the first start).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from receiver._redact import redact_url, redact_urls
from receiver.webhooks import decode_secrets

__all__ = ["ConfigError", "Settings", "load_settings"]

SECRETS_FILENAME = "secrets.json"
GENERATED_SECRETS = ("callback_secret", "admin_token", "event_webhook_secret")


def _generated(name: str) -> str:
    """A new value of a generated secret: a Standard Webhooks `whsec_` key to sign events."""
    if name == "event_webhook_secret":
        return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    return secrets.token_urlsafe(32)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why.

    Any URL in the message is shown with its credentials hidden (`redact_urls`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact_urls(message))


class Settings(BaseSettings):
    """The service's configuration (environment variable names are the upper-case field names)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    header_timeout: float = Field(default=10.0, gt=0)
    body_timeout: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=0, ge=0)  # 0: as many as the open-file limit allows
    public_url: str = ""
    data_dir: Path = Path("data")
    database_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str = ""
    s3_path_style: bool = False
    s3_allow_http: bool = False
    s3_part_size: int = Field(default=8 << 20, ge=5 << 20, le=5 << 30)
    s3_upload_concurrency: int = Field(default=4, ge=1, le=32)
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_region: str = ""
    aws_default_region: str = ""
    callback_secret: SecretStr | None = None
    admin_token: SecretStr | None = None
    metrics_token: SecretStr | None = None  # unset: ADMIN_TOKEN
    kling_api_base: str = "https://api-singapore.klingai.com"
    kling_api_key: SecretStr | None = None
    kling_access_key: str | None = None
    kling_secret_key: SecretStr | None = None
    kling_webhook_secret: SecretStr | None = None
    max_callback_bytes: int = Field(default=1024 * 1024, ge=1024)
    download_concurrency: int = Field(default=4, ge=0, le=64)
    max_asset_bytes: int = Field(default=4 << 30, ge=1)
    allow_private_downloads: bool = False
    download_allowed_hosts: str = ""
    download_lease_seconds: float = Field(default=30.0, ge=1)
    download_retry_hours: float = Field(default=24.0, ge=0)
    download_retry_base_seconds: float = Field(default=2.0, ge=0)
    download_not_found_tries: int = Field(default=5, ge=1)
    download_read_timeout: float = Field(default=60.0, gt=0)
    download_min_rate: float = Field(default=16384.0, ge=0)  # bytes/s; 0: no bound
    download_rate_window: float = Field(default=30.0, gt=0)
    storage_check_seconds: float = Field(default=15.0, gt=0)
    verify_callbacks: bool | None = None
    poll_after: float | None = Field(default=None, gt=0)
    poll_interval: float = Field(default=30.0, gt=0)
    poll_max_interval: float = Field(default=600.0, gt=0)
    poll_give_up_hours: float = Field(default=48.0, gt=0)
    poll_tick_seconds: float = Field(default=5.0, gt=0)
    submit_reconcile_after: float = Field(default=300.0, gt=0)
    kling_retry_base_seconds: float = Field(default=1.0, ge=0)
    archive_watermarked: bool = False
    sweep_interval: float = Field(default=3600.0, ge=0)
    event_webhook_urls: str = ""
    event_webhook_secret: SecretStr | None = None
    allow_private_event_urls: bool = False
    event_dispatch_concurrency: int = Field(default=4, ge=0, le=64)
    expiry_warn_days: float = Field(default=25.0, gt=0, le=30)
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    # Names of the secrets that came from the generated file rather than the environment.
    _generated: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("public_url", "kling_api_base", "s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("callback_secret", "admin_token", "metrics_token")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        """A blank secret would sign callback URLs with no key, or let `Bearer ` in."""
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but blank: give it a value, or unset it to have one generated")
        return value

    @field_validator("kling_api_key", "kling_access_key", "kling_secret_key")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | str | None) -> SecretStr | str | None:
        """A blank credential (`KLING_API_KEY=` in a compose file) means none, not an empty key."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if text is None or not text.strip() else value

    @field_validator("kling_webhook_secret", "event_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Every secret of a rotation must decode now, not at the first signed delivery."""
        if value is None or not value.get_secret_value():
            return None
        decode_secrets(value.get_secret_value())
        return value

    @field_validator("event_webhook_urls")
    @classmethod
    def _event_urls(cls, value: str) -> str:
        for url in _split(value):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{redact_url(url)!r} is not an http(s) URL with a host")
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "an endpoint URL may not hold credentials: events are signed with "
                    "EVENT_WEBHOOK_SECRET, or put a token in the path"
                )
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        # Frozen model: derived values are written once, here, and never again.
        if not self.public_url:
            host = f"[{self.host}]" if ":" in self.host else self.host
            object.__setattr__(self, "public_url", f"http://{host}:{self.port}")
        if not self.database_url:
            path = (self.data_dir / "kling-receiver.db").as_posix()
            object.__setattr__(self, "database_url", f"sqlite:///{path}")
        if not self.storage_url:
            object.__setattr__(self, "storage_url", (self.data_dir / "assets").as_posix())
        if bool(self.kling_access_key) != bool(self.kling_secret_key):
            raise ValueError("KLING_ACCESS_KEY and KLING_SECRET_KEY must be set together")
        if self.storage_url.startswith("s3://"):
            self._check_s3()
        return self

    def _check_s3(self) -> None:
        if not urlsplit(self.storage_url).netloc:
            raise ValueError("STORAGE_URL must name a bucket: s3://bucket/prefix")
        if not (self.aws_access_key_id and self.aws_secret_access_key):
            raise ValueError(
                "an s3:// STORAGE_URL needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if self.s3_endpoint_url.startswith("http://") and not self.s3_allow_http:
            raise ValueError(
                "S3_ENDPOINT_URL is plain http: set S3_ALLOW_HTTP=true to send files over it"
            )

    @property
    def kling_configured(self) -> bool:
        """Whether the service can call Kling's API (an API key, or an access/secret key pair)."""
        return self.kling_api_key is not None or self.kling_access_key is not None

    @property
    def verify(self) -> bool:
        """VERIFY_CALLBACKS, which defaults to on whenever the API can be called."""
        wanted = self.kling_configured if self.verify_callbacks is None else self.verify_callbacks
        return wanted and self.kling_configured

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """DOWNLOAD_ALLOWED_HOSTS as lower-case host suffixes."""
        hosts = (h.strip().strip(".").lower() for h in self.download_allowed_hosts.split(","))
        return tuple(host for host in hosts if host)

    @property
    def event_endpoints(self) -> list[str]:
        """EVENT_WEBHOOK_URLS, in order, each once."""
        return list(dict.fromkeys(_split(self.event_webhook_urls)))

    @property
    def aws_region_name(self) -> str:
        """AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1."""
        return self.aws_region or self.aws_default_region or "us-east-1"

    @property
    def secrets_path(self) -> Path:
        return self.data_dir / SECRETS_FILENAME

    @property
    def generated_secrets(self) -> tuple[str, ...]:
        return self._generated

    @property
    def metrics_bearer(self) -> str:
        """The token `/metrics` takes: METRICS_TOKEN, else ADMIN_TOKEN."""
        return self.secret("metrics_token" if self.metrics_token else "admin_token")

    def secret(self, name: str) -> str:
        """The value of a secret setting; raises if it was never filled in."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{name.upper()} is not set")
        return str(value.get_secret_value())


def load_settings(**overrides: Any) -> Settings:
    """Read, validate and complete the settings, or raise `ConfigError` with a readable reason."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    missing = [name for name in GENERATED_SECRETS if getattr(settings, name) is None]
    if not missing:
        return settings
    stored = _stored_secrets(settings.data_dir, missing)
    completed = settings.model_copy(update={name: SecretStr(stored[name]) for name in missing})
    completed._generated = tuple(missing)
    return completed


def _split(urls: str) -> list[str]:
    return [url.strip() for url in urls.split(",") if url.strip()]


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
        given = error.get("input")
        shown = (
            ""
            if isinstance(given, dict) or "SECRET" in name or "KEY" in name
            else f" (got {_shown(given)})"
        )
        lines.append(f"{name}: {error['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def _shown(given: object) -> str:
    """A rejected value as an error shows it: a string with any credentials in it hidden."""
    return repr(redact_url(given) if isinstance(given, str) else given)


def _stored_secrets(data_dir: Path, names: list[str]) -> dict[str, str]:
    """Generated secrets, kept in a 0600 file; created once even when processes start together."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / SECRETS_FILENAME
        with open(data_dir / ".secrets.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            values = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a JSON object")
            wanted = [name for name in names if not values.get(name)]
            if wanted:
                values.update({name: _generated(name) for name in wanted})
                tmp = path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    json.dump(values, out, indent=2)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            os.chmod(path, 0o600)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot keep generated secrets in {data_dir}: {exc}") from exc
    return {name: str(values[name]) for name in names}
