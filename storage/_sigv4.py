"""AWS Signature Version 4 for the few S3 calls obstore does not make (a metadata-replacing copy).

Header-signed, for service `s3`, with the body's sha256 signed too; see
https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote

import httpx

__all__ = ["sigv4_headers"]


def sigv4_headers(
    method: str,
    url: httpx.URL,
    body: bytes,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    session_token: str | None = None,
    headers: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers (given ones included) that sign this request for service `s3`."""
    now = now or dt.datetime.now(dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now:%Y%m%d}/{region}/s3/aws4_request"
    signed: dict[str, str] = {k.lower(): " ".join(v.split()) for k, v in (headers or {}).items()}
    host = url.host if url.port is None else f"{url.host}:{url.port}"
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": _sha256(body)})
    if session_token:
        signed["x-amz-security-token"] = session_token
    query = sorted(
        (quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in url.params.multi_items()
    )
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            quote(url.path or "/", safe="/-_.~"),
            "&".join(f"{k}={v}" for k, v in query),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            signed["x-amz-content-sha256"],
        ]
    )
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{_sha256(canonical.encode())}"
    key = ("AWS4" + secret_key).encode()
    for part in (f"{now:%Y%m%d}", region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed.pop("host")
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
