"""Standard Webhooks signatures: Kling's test vector, the reference library, and refusals."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from receiver.webhooks import TOLERANCE_SECONDS, SignatureError, WebhookKey, decode_secret

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
