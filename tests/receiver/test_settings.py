"""Settings: defaults, the environment and `.env`, readable errors, and generated secrets."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.settings import ConfigError, Settings, load_settings
from receiver.webhooks import decode_secret

SETTING_NAMES = [name.upper() for name in Settings.model_fields]
WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(24))).decode()
EVENT_SECRET = "whsec_" + base64.b64encode(bytes(range(24, 56))).decode()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts in an empty directory with none of the service's variables set."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, **overrides)
    return str(caught.value)


def stored_secrets(data_dir: Path) -> dict[str, str]:
    values: dict[str, str] = json.loads((data_dir / "secrets.json").read_text())
    return values


def test_defaults() -> None:
    """With nothing set, the service listens on loopback:8000 and keeps everything under data/."""
    settings = load_settings(_env_file=None)
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.data_dir == Path("data")
    assert settings.database_url == "sqlite:///data/kling-receiver.db"
    assert settings.storage_url == "data/assets"
    assert settings.max_callback_bytes == 1024 * 1024
    assert settings.kling_api_base == "https://api-singapore.klingai.com"
    assert settings.log_level == "INFO"
    assert settings.kling_webhook_secret is None
    assert settings.kling_api_key is None


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting is read from the upper-case environment variable of its name."""
    environment = {
        "HOST": "0.0.0.0",
        "PORT": "9001",
        "PUBLIC_URL": "https://hooks.example.com/kling/",
        "DATA_DIR": "/srv/kling",
        "DATABASE_URL": "sqlite:////srv/kling/ledger.db",
        "STORAGE_URL": "/srv/assets",
        "CALLBACK_SECRET": "env-callback-secret-0123456789abcdef",
        "ADMIN_TOKEN": "env-admin-token-0123456789abcdef",
        "KLING_API_BASE": "https://aggregator.example.com/kling",
        "KLING_API_KEY": "env-api-key",
        "KLING_ACCESS_KEY": "env-access-key",
        "KLING_SECRET_KEY": "env-secret-key",
        "KLING_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "EVENT_WEBHOOK_SECRET": EVENT_SECRET,
        "EVENT_WEBHOOK_URLS": "https://a.example/hook, https://b.example/x?k=1,https://a.example/hook",
        "ALLOW_PRIVATE_EVENT_URLS": "true",
        "EVENT_DISPATCH_CONCURRENCY": "2",
        "EXPIRY_WARN_DAYS": "2.5",
        "MAX_CALLBACK_BYTES": "4096",
        "LOG_LEVEL": "debug",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(_env_file=None)
    assert settings.host == "0.0.0.0"
    assert settings.port == 9001
    assert settings.public_url == "https://hooks.example.com/kling"
    assert settings.data_dir == Path("/srv/kling")
    assert settings.database_url == "sqlite:////srv/kling/ledger.db"
    assert settings.storage_url == "/srv/assets"
    assert settings.secret("callback_secret") == "env-callback-secret-0123456789abcdef"
    assert settings.secret("admin_token") == "env-admin-token-0123456789abcdef"
    assert settings.kling_api_base == "https://aggregator.example.com/kling"
    assert settings.secret("kling_api_key") == "env-api-key"
    assert settings.kling_access_key == "env-access-key"
    assert settings.secret("kling_secret_key") == "env-secret-key"
    assert settings.secret("kling_webhook_secret") == WEBHOOK_SECRET
    assert settings.secret("event_webhook_secret") == EVENT_SECRET
    assert settings.event_endpoints == ["https://a.example/hook", "https://b.example/x?k=1"]
    assert settings.allow_private_event_urls
    assert settings.event_dispatch_concurrency == 2
    assert settings.expiry_warn_days == 2.5
    assert settings.max_callback_bytes == 4096
    assert settings.log_level == "DEBUG"
    assert settings.generated_secrets == ()
    assert not Path("/srv/kling").exists()  # nothing was generated, so nothing was written


def test_derived_defaults_follow_host_port_and_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """PUBLIC_URL, DATABASE_URL and STORAGE_URL default from HOST, PORT and DATA_DIR."""
    monkeypatch.setenv("HOST", "::1")
    monkeypatch.setenv("PORT", "8443")
    monkeypatch.setenv("DATA_DIR", "state")
    settings = load_settings(_env_file=None)
    assert settings.public_url == "http://[::1]:8443"
    assert settings.database_url == "sqlite:///state/kling-receiver.db"
    assert settings.storage_url == "state/assets"
    assert (Path("state") / "secrets.json").exists()


def test_settings_come_from_a_dotenv_file(tmp_path: Path) -> None:
    """A .env file in the working directory is read."""
    (tmp_path / ".env").write_text(
        "PORT=9100\nCALLBACK_SECRET=dotenv-callback-secret-0123456789\n"
        "ADMIN_TOKEN=dotenv-admin-token-0123456789\nLOG_LEVEL=warning\n"
        f"EVENT_WEBHOOK_SECRET={EVENT_SECRET}\n"
    )
    settings = load_settings()
    assert settings.port == 9100
    assert settings.public_url == "http://127.0.0.1:9100"
    assert settings.secret("callback_secret") == "dotenv-callback-secret-0123456789"
    assert settings.log_level == "WARNING"
    assert settings.generated_secrets == ()


def test_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A variable set in the environment beats the same one in .env."""
    (tmp_path / ".env").write_text("PORT=9100\nHOST=10.0.0.1\n")
    monkeypatch.setenv("PORT", "9200")
    settings = load_settings()
    assert settings.port == 9200
    assert settings.host == "10.0.0.1"


def test_dotenv_is_skipped_when_asked(tmp_path: Path) -> None:
    """`_env_file=None` ignores a .env file that is present."""
    (tmp_path / ".env").write_text("PORT=9100\n")
    assert load_settings(_env_file=None).port == 8000


def test_unrelated_variables_are_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Variables and .env lines the service does not know are not an error."""
    (tmp_path / ".env").write_text("SOMETHING_ELSE=1\n")
    monkeypatch.setenv("PORTS", "x")
    assert load_settings().port == 8000


@pytest.mark.parametrize("port", ["abc", "70000", "-1", "80.5", ""])
def test_bad_port_names_port(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    """A PORT that is not a port number is a ConfigError that names PORT."""
    monkeypatch.setenv("PORT", port)
    message = config_error()
    assert message.startswith("invalid configuration: PORT: ")
    assert "HOST" not in message


def test_bad_port_in_dotenv_names_port(tmp_path: Path) -> None:
    """A bad PORT in .env is reported the same way."""
    (tmp_path / ".env").write_text("PORT=eighty\n")
    with pytest.raises(ConfigError, match=r"^invalid configuration: PORT: .*'eighty'"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUBLIC_URL", "hooks.example.com"),
        ("KLING_API_BASE", "ftp://api.klingai.com"),
        ("LOG_LEVEL", "loud"),
        ("MAX_CALLBACK_BYTES", "10"),
        # S3 parts under 5 MiB (its minimum) or over 5 GiB, no concurrency, no scheme
        ("S3_PART_SIZE", str(5 * 1024 * 1024 - 1)),
        ("S3_PART_SIZE", "0"),
        ("S3_PART_SIZE", str(5 * 1024**3 + 1)),
        ("S3_UPLOAD_CONCURRENCY", "0"),
        ("S3_ENDPOINT_URL", "minio.internal:9000"),
        ("STORAGE_CHECK_SECONDS", "0"),
    ],
)
def test_bad_values_name_their_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Each bad value is a ConfigError naming the setting and showing what was given."""
    monkeypatch.setenv(name, value)
    message = config_error()
    assert f"{name}: " in message
    assert repr(value) in message


@pytest.mark.parametrize("name", ["S3_ENDPOINT_URL", "KLING_API_BASE", "PUBLIC_URL"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("ftp://AKIAUSER:leak-pass-0123@minio:9000", "ftp://AKIAUSER:***@minio:9000"),
        ("leak-token-0123@api.klingai.com", "***@api.klingai.com"),
        ("api.klingai.com/v1?region=sg&api_key=leak-key-0123", "region=sg&api_key=***"),
        ("s3.example/b?X-Amz-Signature=leak-sig-0123#t", "X-Amz-Signature=***#t"),
    ],
)
def test_credentials_in_a_bad_url_setting_are_hidden(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, shown: str
) -> None:
    """A bad URL setting is shown with its password, token or key replaced by ***."""
    monkeypatch.setenv(name, value)
    message = config_error()
    assert f"{name}: " in message and shown in message
    assert "leak-" not in message


def test_several_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """All bad settings are named in one message, not one per start."""
    monkeypatch.setenv("PORT", "x")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    message = config_error()
    assert "PORT: " in message
    assert "LOG_LEVEL: " in message


def test_secrets_are_never_shown_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error message names settings but never prints the value of a secret."""
    secrets = {
        "CALLBACK_SECRET": "leak-callback-0123456789",
        "ADMIN_TOKEN": "leak-admin-0123456789",
        "KLING_API_KEY": "leak-api-key-0123456789",
        "KLING_ACCESS_KEY": "leak-access-key-0123456789",
        "KLING_WEBHOOK_SECRET": "whsec_leak!webhook!0123456789",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PORT", "x")
    message = config_error()
    assert "PORT: " in message
    assert "KLING_WEBHOOK_SECRET: " in message
    for value in secrets.values():
        assert value not in message
        assert value[5:15] not in message


@pytest.mark.parametrize(
    "value",
    ["not-a-secret!", "whsec_", "whsec_***", "whsec_a", "whsec_====", "whsec_a b c d"],
)
def test_bad_webhook_secret_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A KLING_WEBHOOK_SECRET that is not base64 (after whsec_) stops the start."""
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", value)
    message = config_error()
    assert message.startswith("invalid configuration: KLING_WEBHOOK_SECRET: ")
    assert "whsec_" in message  # says what shape is expected


@pytest.mark.parametrize("size", [24, 32, 64, 1, 2, 35])
@pytest.mark.parametrize("prefix", ["whsec_", ""])
@pytest.mark.parametrize("padded", [True, False])
def test_good_webhook_secrets_are_accepted(
    monkeypatch: pytest.MonkeyPatch, size: int, prefix: str, padded: bool
) -> None:
    """Standard Webhooks secrets of any size are accepted, padded or not, with or without whsec_."""
    encoded = base64.b64encode(os.urandom(size)).decode()
    value = prefix + (encoded if padded else encoded.rstrip("="))
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", value)
    settings = load_settings(_env_file=None)
    assert settings.secret("kling_webhook_secret") == value


def test_empty_webhook_secret_means_unsigned(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty KLING_WEBHOOK_SECRET is the same as none: signatures are not checked."""
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", "")
    assert load_settings(_env_file=None).kling_webhook_secret is None


@pytest.mark.parametrize("present", ["KLING_ACCESS_KEY", "KLING_SECRET_KEY"])
def test_half_an_access_key_pair_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, present: str
) -> None:
    """KLING_ACCESS_KEY and KLING_SECRET_KEY are refused one without the other."""
    monkeypatch.setenv(present, "half-of-a-pair-0123456789")
    message = config_error()
    assert "KLING_ACCESS_KEY and KLING_SECRET_KEY must be set together" in message
    assert "half-of-a-pair" not in message


@pytest.mark.parametrize("name", ["CALLBACK_SECRET", "ADMIN_TOKEN"])
@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_service_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A blank CALLBACK_SECRET or ADMIN_TOKEN is an error, never an empty key or token."""
    monkeypatch.setenv(name, value)
    assert f"{name}: Value error, is set but blank" in config_error()


@pytest.mark.parametrize("names", [("KLING_API_KEY",), ("KLING_ACCESS_KEY", "KLING_SECRET_KEY")])
def test_blank_kling_credentials_count_as_none(
    monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]
) -> None:
    """KLING_API_KEY= (or a blank access/secret pair) leaves the API unconfigured."""
    for name in names:
        monkeypatch.setenv(name, " ")
    settings = load_settings(_env_file=None)
    assert not settings.kling_configured
    assert not settings.verify


def test_secret_raises_for_an_unset_secret() -> None:
    """Asking for a secret that was never filled in is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"^KLING_API_KEY is not set$"):
        load_settings(_env_file=None).secret("kling_api_key")


def test_generated_secrets_are_stored_privately(tmp_path: Path) -> None:
    """Unset CALLBACK_SECRET, ADMIN_TOKEN and EVENT_WEBHOOK_SECRET are generated, strong, into
    a 0600 secrets.json; the event secret is a Standard Webhooks `whsec_` key."""
    data_dir = tmp_path / "data"
    settings = load_settings(_env_file=None, data_dir=data_dir)
    assert settings.generated_secrets == ("callback_secret", "admin_token", "event_webhook_secret")
    event_secret = settings.secret("event_webhook_secret")
    assert len(decode_secret(event_secret)) == 32 and event_secret.startswith("whsec_")
    assert settings.secrets_path == data_dir / "secrets.json"
    callback_secret = settings.secret("callback_secret")
    admin_token = settings.secret("admin_token")
    assert len(callback_secret) >= 32
    assert len(admin_token) >= 32
    assert callback_secret != admin_token
    assert stored_secrets(data_dir) == {
        "callback_secret": callback_secret,
        "admin_token": admin_token,
        "event_webhook_secret": event_secret,
    }
    assert stat.S_IMODE(os.stat(settings.secrets_path).st_mode) == 0o600


def test_generated_secrets_are_private_even_with_an_open_umask(tmp_path: Path) -> None:
    """The secrets file is 0600 whatever the process umask."""
    previous = os.umask(0)
    try:
        settings = load_settings(_env_file=None, data_dir=tmp_path / "data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(settings.secrets_path).st_mode) == 0o600


def test_generated_secrets_differ_between_installations(tmp_path: Path) -> None:
    """Two data directories get different secrets."""
    one = load_settings(_env_file=None, data_dir=tmp_path / "one")
    two = load_settings(_env_file=None, data_dir=tmp_path / "two")
    assert one.secret("callback_secret") != two.secret("callback_secret")
    assert one.secret("admin_token") != two.secret("admin_token")


def test_generated_secrets_are_kept_across_starts(tmp_path: Path) -> None:
    """A second start reads the same secrets back instead of generating new ones."""
    first = load_settings(_env_file=None, data_dir=tmp_path / "data")
    second = load_settings(_env_file=None, data_dir=tmp_path / "data")
    assert second.secret("callback_secret") == first.secret("callback_secret")
    assert second.secret("admin_token") == first.secret("admin_token")
    assert second.secret("event_webhook_secret") == first.secret("event_webhook_secret")
    assert second.generated_secrets == ("callback_secret", "admin_token", "event_webhook_secret")


def test_secrets_from_the_environment_are_not_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A secret set in the environment is used as is and never copied into secrets.json."""
    monkeypatch.setenv("ADMIN_TOKEN", "env-admin-token-0123456789abcdef")
    monkeypatch.setenv("EVENT_WEBHOOK_SECRET", EVENT_SECRET)
    data_dir = tmp_path / "data"
    settings = load_settings(_env_file=None, data_dir=data_dir)
    assert settings.generated_secrets == ("callback_secret",)
    assert settings.secret("admin_token") == "env-admin-token-0123456789abcdef"
    assert stored_secrets(data_dir) == {"callback_secret": settings.secret("callback_secret")}

    monkeypatch.delenv("ADMIN_TOKEN")
    monkeypatch.delenv("EVENT_WEBHOOK_SECRET")
    later = load_settings(_env_file=None, data_dir=data_dir)
    assert later.secret("callback_secret") == settings.secret("callback_secret")
    assert later.secret("admin_token") != "env-admin-token-0123456789abcdef"
    assert later.secret("event_webhook_secret") != EVENT_SECRET
    assert set(stored_secrets(data_dir)) == {
        "callback_secret",
        "admin_token",
        "event_webhook_secret",
    }


def test_a_damaged_secrets_file_is_a_config_error(tmp_path: Path) -> None:
    """An unreadable secrets.json stops the start rather than silently replacing the secrets."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "secrets.json").write_text('{"callback_secret": "half')
    with pytest.raises(ConfigError, match="cannot keep generated secrets"):
        load_settings(_env_file=None, data_dir=data_dir)
    assert (data_dir / "secrets.json").read_text() == '{"callback_secret": "half'


def test_an_unusable_data_dir_is_a_config_error(tmp_path: Path) -> None:
    """A DATA_DIR that cannot be a directory is a ConfigError naming it."""
    blocker = tmp_path / "data"
    blocker.write_text("a file, not a directory")
    with pytest.raises(ConfigError, match=f"cannot keep generated secrets in {blocker}"):
        load_settings(_env_file=None, data_dir=blocker)


GENERATE = """
import json, sys, time
from receiver.settings import load_settings
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
settings = load_settings(_env_file=None)
print(json.dumps([settings.secret("callback_secret"), settings.secret("admin_token")]))
"""


def test_processes_starting_together_agree_on_generated_secrets(tmp_path: Path) -> None:
    """Processes that generate the secrets at the same moment all end with the same values."""
    data_dir = tmp_path / "data"
    environment = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in SETTING_NAMES and not name.upper().endswith("_PROXY")
    }
    environment["DATA_DIR"] = str(data_dir)
    start = time.time() + 2  # late enough for every interpreter to be up and spinning
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", GENERATE, str(start)],
            env=environment,
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        results.append(tuple(json.loads(out)))
    assert len(set(results)) == 1
    stored = stored_secrets(data_dir)
    assert results[0] == (stored["callback_secret"], stored["admin_token"])


S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIATESTKEY0123", "AWS_SECRET_ACCESS_KEY": "s3-secret-0123456789"}


@pytest.mark.parametrize(
    "present",
    [{}, {"AWS_ACCESS_KEY_ID": "AKIATESTKEY0123"}, {"AWS_SECRET_ACCESS_KEY": "s3-secret-0123"}],
    ids=["neither", "key-id-only", "secret-only"],
)
def test_an_s3_storage_url_needs_both_aws_keys(
    monkeypatch: pytest.MonkeyPatch, present: dict[str, str]
) -> None:
    """STORAGE_URL=s3://… without both AWS keys is a ConfigError naming both variables."""
    monkeypatch.setenv("STORAGE_URL", "s3://bucket/prefix")
    for name, value in present.items():
        monkeypatch.setenv(name, value)
    message = config_error()
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    for value in present.values():
        assert value not in message


def test_an_empty_aws_secret_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_SECRET_ACCESS_KEY set to an empty string is no secret at all."""
    monkeypatch.setenv("STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY0123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in config_error()


def test_an_s3_storage_url_must_name_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:///prefix (no bucket) is refused with the expected shape of the URL."""
    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STORAGE_URL", "s3:///prefix")
    assert "STORAGE_URL must name a bucket: s3://bucket/prefix" in config_error()


def test_aws_keys_are_not_needed_for_local_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an s3:// STORAGE_URL, no AWS or S3 setting is required or checked."""
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = load_settings(_env_file=None)
    assert settings.storage_url == "data/assets"
    assert settings.aws_access_key_id is None


def test_a_plain_http_endpoint_needs_s3_allow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """An http:// S3_ENDPOINT_URL is refused unless S3_ALLOW_HTTP=true; https needs nothing."""
    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio.internal:9000")
    message = config_error()
    assert "S3_ENDPOINT_URL is plain http: set S3_ALLOW_HTTP=true" in message
    assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in message
    monkeypatch.setenv("S3_ALLOW_HTTP", "true")
    assert load_settings(_env_file=None).s3_endpoint_url == "http://minio.internal:9000"
    monkeypatch.setenv("S3_ALLOW_HTTP", "false")
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://minio.internal:9000/")
    assert load_settings(_env_file=None).s3_endpoint_url == "https://minio.internal:9000"


def test_five_mib_parts_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3_PART_SIZE of exactly 5 MiB is the smallest allowed; the default is 8 MiB."""
    assert load_settings(_env_file=None).s3_part_size == 8 * 1024 * 1024
    monkeypatch.setenv("S3_PART_SIZE", str(5 * 1024 * 1024))
    assert load_settings(_env_file=None).s3_part_size == 5 * 1024 * 1024


@pytest.mark.parametrize(
    ("region", "default_region", "expected"),
    [
        ("eu-west-3", "ap-south-1", "eu-west-3"),
        ("", "ap-south-1", "ap-south-1"),
        (None, "ap-south-1", "ap-south-1"),
        (None, None, "us-east-1"),
        ("", "", "us-east-1"),
    ],
)
def test_aws_region_wins_over_aws_default_region(
    monkeypatch: pytest.MonkeyPatch,
    region: str | None,
    default_region: str | None,
    expected: str,
) -> None:
    """AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1."""
    for name, value in (("AWS_REGION", region), ("AWS_DEFAULT_REGION", default_region)):
        if value is not None:
            monkeypatch.setenv(name, value)
    assert load_settings(_env_file=None).aws_region_name == expected


def test_sink_for_builds_an_s3_sink_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """sink_for() turns STORAGE_URL, S3_* and AWS_* into an S3Sink with those options."""
    from receiver.workers import sink_for
    from storage import S3Options, S3Sink

    environment = {
        **S3_KEYS,
        "AWS_SESSION_TOKEN": "session-token-0123",
        "AWS_DEFAULT_REGION": "eu-central-1",
        "STORAGE_URL": "s3://media-bucket/kling/archive/",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9000/",
        "S3_PATH_STYLE": "true",
        "S3_ALLOW_HTTP": "true",
        "S3_PART_SIZE": str(16 * 1024 * 1024),
        "S3_UPLOAD_CONCURRENCY": "3",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    sink = sink_for(load_settings(_env_file=None))
    assert isinstance(sink, S3Sink)
    assert (sink.bucket, sink.prefix) == ("media-bucket", "kling/archive/")
    assert sink.endpoint == "http://127.0.0.1:9000"
    assert sink.options == S3Options(
        access_key_id="AKIATESTKEY0123",
        secret_access_key="s3-secret-0123456789",
        session_token="session-token-0123",
        region="eu-central-1",
        endpoint_url="http://127.0.0.1:9000",
        path_style=True,
        allow_http=True,
        part_size=16 * 1024 * 1024,
        upload_concurrency=3,
    )
    assert sink.location("videos/t/0.mp4") == "s3://media-bucket/kling/archive/videos/t/0.mp4"


def test_sink_for_defaults_to_aws_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without S3_ENDPOINT_URL the sink talks to AWS in the region, virtual-hosted, https only."""
    from receiver.workers import sink_for
    from storage import S3Sink

    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("STORAGE_URL", "s3://media-bucket")
    sink = sink_for(load_settings(_env_file=None))
    assert isinstance(sink, S3Sink)
    assert (sink.bucket, sink.prefix) == ("media-bucket", "")
    assert sink.endpoint == "https://s3.eu-west-3.amazonaws.com"
    assert sink.options.endpoint_url is None
    assert sink.options.session_token is None
    assert not sink.options.path_style and not sink.options.allow_http
    assert sink.options.part_size == 8 * 1024 * 1024


def test_sink_for_a_local_storage_url_is_a_local_sink(tmp_path: Path) -> None:
    """A path STORAGE_URL gives a LocalSink, whatever AWS keys are around."""
    from receiver.workers import sink_for
    from storage import LocalSink

    settings = load_settings(
        _env_file=None,
        storage_url=str(tmp_path / "assets"),
        aws_access_key_id="AKIATESTKEY0123",
        aws_secret_access_key="s3-secret-0123456789",
    )
    sink = sink_for(settings)
    assert isinstance(sink, LocalSink)
    assert sink.root == tmp_path / "assets"


def test_every_setting_is_documented_in_the_readme() -> None:
    """Each setting's variable appears in the README, so a new one cannot go unexplained."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    undocumented = [name for name in SETTING_NAMES if f"`{name}`" not in readme]
    assert undocumented == []


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("ftp://a.example/x", "is not an http(s) URL with a host"),
        ("https://", "is not an http(s) URL with a host"),
        ("https://user:pw@a.example/x", "may not hold credentials"),
    ],
)
def test_event_webhook_urls_are_checked_at_start(urls: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_settings(_env_file=None, event_webhook_urls=urls)
    assert "pw" not in str(raised.value)


def test_a_malformed_event_webhook_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EVENT_WEBHOOK_SECRET") as raised:
        load_settings(_env_file=None, data_dir=tmp_path, event_webhook_secret="whsec_???")
    assert "???" not in str(raised.value)
