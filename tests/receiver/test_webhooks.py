"""Standard Webhooks signatures: Kling's test vector, the reference library, refusals, and
several secrets at once while one is rolled."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.settings import ConfigError
from receiver.webhooks import (
    TOLERANCE_SECONDS,
    SignatureError,
    WebhookKey,
    decode_secret,
    split_secrets,
)
from tests.support import CALLBACK_SECRET, app_settings

# The test vector of Kling's callback-signature documentation.
DOC_SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
DOC_ID = "9876543210"
DOC_TIMESTAMP = 1781080794
DOC_BODY = (
    b'{"id":"1234567890","status":"succeeded","message":"",'
    b'"create_time":1781080778802,"update_time":1781080794151}'
)
DOC_SIGNATURE = "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4="


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def headers(signature: str, msg_id: str = DOC_ID, at: int | str = DOC_TIMESTAMP) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(at), "webhook-signature": signature}


def refusal(
    signature: str, body: bytes = DOC_BODY, msg_id: str = DOC_ID, at: int | str = DOC_TIMESTAMP
) -> str:
    with pytest.raises(SignatureError) as caught:
        WebhookKey(DOC_SECRET).verify(headers(signature, msg_id, at), body, now=DOC_TIMESTAMP)
    return str(caught.value)


def test_documented_test_vector_is_signed_and_verified() -> None:
    """Kling's own example signs to the documented value, and that signature verifies."""
    key = WebhookKey(DOC_SECRET)
    assert key.sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY) == DOC_SIGNATURE
    key.verify(headers(DOC_SIGNATURE), DOC_BODY, now=DOC_TIMESTAMP)


@given(msg_id=st.text(st.characters(codec="ascii"), min_size=1), body=st.binary())
def test_reference_library_agrees_both_ways(msg_id: str, body: bytes) -> None:
    """What the standardwebhooks library signs verifies here, and what is signed here verifies
    there."""
    secret = DOC_SECRET
    now = datetime.now(UTC)
    stamp = int(now.timestamp())
    theirs = Webhook(secret).sign(msg_id, now, body)
    WebhookKey(secret).verify(headers(theirs, msg_id, stamp), body)
    ours = WebhookKey(secret).sign(msg_id, stamp, body)
    Webhook(secret).verify(body, headers(ours, msg_id, stamp), json_parse=False)


def test_either_signature_of_a_key_rotation_verifies() -> None:
    """During a rotation the header carries two signatures; the one under our secret is enough."""
    other = WebhookKey(new_secret()).sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY)
    key = WebhookKey(DOC_SECRET)
    key.verify(headers(f"{other} {DOC_SIGNATURE}"), DOC_BODY, now=DOC_TIMESTAMP)
    key.verify(headers(f"{DOC_SIGNATURE} {other}"), DOC_BODY, now=DOC_TIMESTAMP)


def test_other_schemes_are_passed_over() -> None:
    """A `v1a` (asymmetric) entry beside the v1 one is not ours to check and refuses nothing."""
    asymmetric = f"v1a,{base64.b64encode(b'x' * 64).decode()}"
    key = WebhookKey(DOC_SECRET)
    key.verify(headers(f"{asymmetric} {DOC_SIGNATURE}"), DOC_BODY, now=DOC_TIMESTAMP)
    assert "no v1 signature" in refusal(asymmetric)


def test_signature_of_another_body_or_secret_is_refused() -> None:
    """A changed body, id or timestamp, or another secret, matches no signature."""
    assert "no v1 signature matches" in refusal(DOC_SIGNATURE, body=DOC_BODY + b" ")
    assert "no v1 signature matches" in refusal(DOC_SIGNATURE, msg_id="9876543211")
    assert "no v1 signature matches" in refusal(DOC_SIGNATURE, at=DOC_TIMESTAMP + 1)
    forged = WebhookKey(new_secret()).sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY)
    assert "no v1 signature matches" in refusal(forged)


@pytest.mark.parametrize(
    "signature",
    ["v1", "garbage", "v1,a,b", "v1,c2lnbmF0dXJl", ",abc", "v1,!!!!", f"{DOC_SIGNATURE} v1"],
)
def test_malformed_signatures_are_named(signature: str) -> None:
    """Anything but space-separated `v1,<base64 of 32 bytes>` entries is refused in words."""
    assert refusal(signature) == "webhook-signature must be space-separated v1,<base64> signatures"


@pytest.mark.parametrize(
    "stamp", ["", "1781080794.5", "-1781080794", "\uff11\uff17\uff18\uff11", "9" * 40]
)
def test_timestamps_must_be_whole_seconds(stamp: str) -> None:
    """A timestamp that is not plain whole seconds is refused, however large."""
    reason = refusal(DOC_SIGNATURE, at=stamp)
    assert "webhook-timestamp" in reason


@pytest.mark.parametrize(
    ("offset", "verdict"),
    [
        (-TOLERANCE_SECONDS - 1, "too old"),
        (-TOLERANCE_SECONDS, None),
        (TOLERANCE_SECONDS, None),
        (TOLERANCE_SECONDS + 1, "too new"),
    ],
)
def test_five_minutes_either_way(offset: int, verdict: str | None) -> None:
    """A timestamp up to five minutes from our clock is accepted, one second more is not."""
    key = WebhookKey(DOC_SECRET)
    if verdict is None:
        key.verify(headers(DOC_SIGNATURE), DOC_BODY, now=DOC_TIMESTAMP - offset)
        return
    with pytest.raises(SignatureError, match=verdict):
        key.verify(headers(DOC_SIGNATURE), DOC_BODY, now=DOC_TIMESTAMP - offset)


def test_missing_headers_are_named() -> None:
    """Each missing header is named; an empty one counts as missing."""
    key = WebhookKey(DOC_SECRET)
    with pytest.raises(SignatureError, match=r"^the webhook-timestamp header is missing$"):
        key.verify({"webhook-id": DOC_ID, "webhook-signature": DOC_SIGNATURE}, DOC_BODY)
    with pytest.raises(SignatureError, match="webhook-id, webhook-signature headers are missing"):
        key.verify({"webhook-id": "", "webhook-timestamp": str(DOC_TIMESTAMP)}, DOC_BODY)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_!!!", "plain words"])
def test_secrets_without_a_key_are_refused(secret: str) -> None:
    """A secret with no base64 key after `whsec_` is a ValueError, never an empty key."""
    with pytest.raises(ValueError, match="whsec_"):
        decode_secret(secret)


def test_unpadded_secret_is_the_same_key() -> None:
    """A secret copied without its `=` padding is the same key."""
    assert decode_secret(DOC_SECRET.rstrip("=")) == decode_secret(DOC_SECRET)


# -- several secrets: rolling KLING_WEBHOOK_SECRET ------------------------------------------


def verifies(secrets: str, signature: str, body: bytes = DOC_BODY) -> bool:
    """Whether a delivery of the documented id and timestamp verifies under `secrets`."""
    try:
        WebhookKey(secrets).verify(headers(signature), body, now=DOC_TIMESTAMP)
    except SignatureError:
        return False
    return True


@pytest.mark.parametrize(
    "setting",
    [
        "{doc},{other}",
        "{other},{doc}",
        "{doc} {other}",
        "{other} {doc}",
        "{other}, {doc}",
        " {other}\t{doc}\n",
    ],
)
def test_documented_test_vector_verifies_as_either_of_two_secrets(setting: str) -> None:
    """Kling's example verifies whether its secret is the newer or the older of two, whichever
    separator is used."""
    assert verifies(setting.format(doc=DOC_SECRET, other=new_secret()), DOC_SIGNATURE)


@pytest.mark.parametrize("separator", [",", " "])
def test_old_secret_verifies_until_it_is_dropped(separator: str) -> None:
    """A delivery signed with the old secret verifies while both are set, and not after."""
    new, old = new_secret(), new_secret()
    signed_old = WebhookKey(old).sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY)
    assert verifies(f"{new}{separator}{old}", signed_old)
    assert not verifies(new, signed_old)
    with pytest.raises(SignatureError, match=r"no v1 signature matches .*KLING_WEBHOOK_SECRET"):
        WebhookKey(new).verify(headers(signed_old), DOC_BODY, now=DOC_TIMESTAMP)


def test_the_newest_secret_signs() -> None:
    """With several secrets set, what we sign is signed with the first (newest) one."""
    other = new_secret()
    assert WebhookKey(f"{DOC_SECRET} {other}").sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY) == (
        DOC_SIGNATURE
    )
    assert WebhookKey(f"{other},{DOC_SECRET}").sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY) == (
        WebhookKey(other).sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY)
    )


@pytest.mark.parametrize(
    "configured", [("old",), ("new",), ("old", " ", "new"), ("new", ",", "old")]
)
def test_both_signatures_of_klings_buffer_verify_under_either_secret(
    configured: tuple[str, ...],
) -> None:
    """During Kling's 7-day buffer the header carries old and new signatures; either secret of
    ours, or both, accepts it, while a changed body still matches neither."""
    old = new_secret()
    names = {"old": old, "new": DOC_SECRET}
    secrets = "".join(names.get(part, part) for part in configured)
    signature = f"{WebhookKey(old).sign(DOC_ID, DOC_TIMESTAMP, DOC_BODY)} {DOC_SIGNATURE}"
    assert verifies(secrets, signature)
    assert not verifies(secrets, signature, body=DOC_BODY + b" ")


def test_a_malformed_entry_is_named_beside_a_match_under_several_secrets() -> None:
    """Several secrets change nothing about malformed headers: they are refused in words."""
    with pytest.raises(SignatureError, match=r"v1,<base64>"):
        WebhookKey(f"{new_secret()} {DOC_SECRET}").verify(
            headers(f"{DOC_SIGNATURE} v1,!!!!"), DOC_BODY, now=DOC_TIMESTAMP
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("a b", ["a", "b"]),
        ("  a ,\tb  c\n", ["a", "b", "c"]),
    ],
)
def test_spaces_and_commas_separate_secrets(text: str, expected: list[str]) -> None:
    """Spaces and commas, alone or together, separate secrets and are not part of them."""
    assert split_secrets(text) == expected


@pytest.mark.parametrize("text", ["a,,b", "a,", ",a", "a, ,b", " "])
def test_an_empty_place_is_refused(text: str) -> None:
    """Two commas in a row, a comma at either end, or nothing but spaces is refused."""
    with pytest.raises(ValueError, match="whsec_"):
        split_secrets(text)


def config_error(tmp_path: Path, setting: str) -> str:
    with pytest.raises(ConfigError) as caught:
        app_settings(tmp_path, kling_webhook_secret=setting)
    message = str(caught.value)
    assert message.startswith("invalid configuration: KLING_WEBHOOK_SECRET: ")
    return message


def assert_not_shown(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message
        assert secret.removeprefix("whsec_")[:10] not in message


@pytest.mark.parametrize("setting", ["{a},,{b}", "{a},", ",{a} {b}"])
def test_empty_secret_in_the_setting_is_a_config_error(tmp_path: Path, setting: str) -> None:
    """An empty place in KLING_WEBHOOK_SECRET stops the start, saying where, not what."""
    a, b = new_secret(), new_secret()
    message = config_error(tmp_path, setting.format(a=a, b=b))
    assert "is empty" in message
    assert_not_shown(message, a, b)


def test_bad_secret_in_the_setting_is_named_by_position(tmp_path: Path) -> None:
    """A secret that does not decode stops the start, named by its position, never shown."""
    good, bad = new_secret(), "whsec_leak!webhook!0123456789"
    message = config_error(tmp_path, f"{good} {bad},{new_secret()}")
    assert "secret 2 of 3 must be the whsec_... secret from Kling" in message
    assert_not_shown(message, good, bad)


@pytest.mark.parametrize(
    "twice",
    [
        lambda secret: secret,
        lambda secret: secret.removeprefix("whsec_"),
        lambda secret: secret.rstrip("="),
    ],
    ids=["same-text", "without-prefix", "without-padding"],
)
def test_the_same_secret_twice_is_a_config_error(
    tmp_path: Path, twice: Callable[[str], str]
) -> None:
    """The same key listed twice, however written, stops the start as a likely slip."""
    first, second = new_secret(), new_secret()
    message = config_error(tmp_path, f"{first} {second},{twice(first)}")
    assert "secrets 1 and 3 are the same key" in message
    assert_not_shown(message, first, second)


def test_app_accepts_a_callback_signed_with_the_old_secret(tmp_path: Path) -> None:
    """Through the real app, with KLING_WEBHOOK_SECRET="new old", a callback signed with the
    old secret is recorded, and one signed with neither is refused."""
    new, old, stranger = new_secret(), new_secret(), new_secret()
    settings = app_settings(tmp_path, kling_webhook_secret=f"{new} {old}")
    body = json.dumps({"task_id": "867283741759111202", "task_status": "submitted"}).encode()
    with TestClient(create_app(settings)) as client:
        for secret, status in [(old, 200), (stranger, 401)]:
            now = datetime.now(UTC)
            signed = {
                "webhook-id": "msg_rotation",
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(secret).sign("msg_rotation", now, body.decode()),
            }
            url = tokens.callback_path(CALLBACK_SECRET, tokens.new_channel_ref(), None)
            response = client.post(url, content=body, headers=signed)
            assert response.status_code == status, response.text
