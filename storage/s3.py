"""The S3-compatible sink: downloads stream straight into a bucket, and nothing partial shows.

`STORAGE_URL=s3://bucket/prefix` stores each file at `prefix/<key>` (the local sink's
key layout) with its JSON sidecar at `prefix/<key>.json`, written last.

- A body no larger than one part (`part_size`, 8 MiB by default) is held in memory and
  sent in one PUT, with its Content-Type and sha256 as metadata.
- A larger body streams into a multipart upload (obstore), fed from the download thread
  through a small bounded queue, so memory stays near (concurrency + 2) parts whatever
  the size. The upload completes only after the download checked out (length and byte
  count); on any failure its source raises instead, and obstore aborts the upload, so no
  parts are left behind.
- While it streams, each full buffer the download read into goes to obstore as it is,
  not copied: obstore holds it (through the buffer protocol) until its part is sent,
  and the next reads reuse the buffers it has let go of.
- S3 fixes an object's metadata when its upload begins, before the sha256 is known, so a
  multipart object receives its sha256 through a copy onto itself that replaces the
  metadata: one server-side call, guarded by the ETag the upload returned.
- A file already stored with the same bytes is not uploaded again. When the sidecar says
  the key holds a file of this size, the download is only hashed, and it is committed as
  it stands when the hashes agree.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx
import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from storage._errors import SinkError
from storage._sigv4 import sigv4_headers
from storage.fetch import READ_SIZE
from storage.naming import extension, key_parts

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import S3Config

__all__ = ["S3Options", "S3Sink", "S3Writer"]

log = logging.getLogger("storage.s3")

PROBE_KEY = ".kling-receiver/ready"
"""Written (and read back) under the prefix to check that the bucket takes files."""

_QUEUED_CHUNKS = 4  # chunks (of READ_SIZE, 1 MiB) between the download thread and the upload
_COPY_MAX = 5 << 30  # CopyObject's limit: larger objects keep their sha256 in the sidecar only
_STOP_SECONDS = 60.0  # how long closing a writer waits for its upload to abort
_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_S3_ERROR = re.compile(r"<Code>([^<]*)</Code>(?:\s*<Message>([^<]*)</Message>)?")


@dataclass(frozen=True, slots=True)
class S3Options:
    """How to reach the bucket: endpoint, credentials and upload shape."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    region: str = "us-east-1"
    endpoint_url: str | None = None  # None: AWS itself
    path_style: bool = False
    allow_http: bool = False
    part_size: int = 8 << 20
    upload_concurrency: int = 4


class S3Sink:
    """Files in one bucket, under one prefix."""

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = "/".join(key_parts(prefix)) + "/" if prefix else ""
        self.options = options
        endpoint = options.endpoint_url or f"https://s3.{options.region}.amazonaws.com"
        self.endpoint = endpoint.rstrip("/")
        self._store = self._open_store(retries=6, within=dt.timedelta(minutes=2))
        # The readiness check should answer within seconds, not wait out a long retry.
        self._probe_store = self._open_store(retries=1, within=dt.timedelta(seconds=10))
        # One call per multipart object: each on a connection of its own, closed after it, so
        # an idle sink holds no socket (building a client costs more than connecting).
        self._http = httpx.Client(
            trust_env=False,
            timeout=httpx.Timeout(300.0, connect=10.0),
            headers={"connection": "close"},
        )
        self._replace: set[str] = set()  # keys whose stored bytes a download turned out to differ
        self._lock = threading.Lock()

    def _open_store(self, retries: int, within: dt.timedelta) -> S3Store:
        options = self.options
        config: S3Config = {
            "endpoint": self.endpoint,
            "access_key_id": options.access_key_id,
            "secret_access_key": options.secret_access_key,
            "region": options.region,
            "virtual_hosted_style_request": not options.path_style,
        }
        if options.session_token:
            config["session_token"] = options.session_token
        return S3Store(
            self.bucket,
            config=config,
            client_options={"allow_http": options.allow_http, "connect_timeout": "10s"},
            retry_config={"max_retries": retries, "retry_timeout": within},
        )

    def location(self, key: str) -> str:
        """`s3://bucket/prefix/key`."""
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def object_key(self, key: str) -> str:
        """The key in the bucket: the prefix, then `key` once checked."""
        return self.prefix + "/".join(key_parts(key))

    def open(self, stem: str) -> S3Writer:
        """A writer for the key `stem` + extension."""
        return S3Writer(self, stem)

    def check(self) -> str | None:
        """None when the bucket takes files; otherwise a sentence that says what to fix."""
        probe = self.prefix + PROBE_KEY
        note = json.dumps({"checked_at": dt.datetime.now(dt.UTC).isoformat()}).encode()
        try:
            obstore.put(self._probe_store, probe, note, use_multipart=False)
            obstore.get(self._probe_store, probe).bytes()
        except Exception as exc:  # whatever the store says, the answer is a sentence
            return self.error(exc, "store files in").reason
        return None

    def presign(self, location: str, seconds: int) -> str | None:
        """A URL anyone may GET for `seconds`, if `location` is in this bucket."""
        ours = f"s3://{self.bucket}/"
        if not location.startswith(ours):
            return None
        key = location.removeprefix(ours)
        return obstore.sign(self._store, "GET", key, dt.timedelta(seconds=seconds))

    def stored(self, key: str, size: int | None) -> dict[str, Any] | None:
        """The sidecar of a complete file already at `key` (of `size` bytes, when known)."""
        with self._lock:
            if key in self._replace:
                return None
        try:
            note = json.loads(bytes(obstore.get(self._store, key + ".json").bytes()))
            if not isinstance(note, dict) or not isinstance(note.get("sha256"), str):
                return None
            if size is not None and note.get("size") != size:
                return None
            if obstore.head(self._store, key)["size"] != note.get("size"):
                return None
        except (FileNotFoundError, ValueError):  # nothing there, or a sidecar that is not ours
            return None
        except Exception as exc:
            raise self.error(exc, "read", key + ".json") from exc
        return note

    def replace(self, key: str, replace: bool) -> None:
        """Whether the next download of `key` is uploaded even if a sidecar says it is there."""
        with self._lock:
            if replace:
                self._replace.add(key)
            else:
                self._replace.discard(key)

    def put(self, key: str, body: bytes | bytearray, attributes: Attributes) -> None:
        """One PUT of a whole body."""
        try:
            obstore.put(self._store, key, body, attributes=attributes, use_multipart=False)
        except Exception as exc:
            raise self.error(exc, "upload to", key) from exc

    def upload(
        self, key: str, chunks: Iterator[bytes | bytearray | memoryview], content_type: str
    ) -> str | None:
        """A multipart upload of what `chunks` yields; its ETag. Aborted if `chunks` raises."""
        options = self.options
        result = obstore.put(
            self._store,
            key,
            chunks,
            attributes={"Content-Type": content_type},
            use_multipart=True,
            chunk_size=options.part_size,
            max_concurrency=options.upload_concurrency,
        )
        return result["e_tag"]

    def set_metadata(
        self, key: str, etag: str | None, content_type: str, sha256: str, size: int
    ) -> None:
        """Replace the metadata of the object at `key` by copying it onto itself."""
        if size > _COPY_MAX:
            log.info("sha256 kept in the sidecar only", extra={"key": key, "size": size})
            return
        url = self._object_url(key)
        headers = {
            "content-type": content_type,
            "x-amz-copy-source": quote(f"/{self.bucket}/{key}", safe="/-_.~"),
            "x-amz-metadata-directive": "REPLACE",
            "x-amz-meta-sha256": sha256,
        }
        if etag:
            headers["x-amz-copy-source-if-match"] = etag
        options = self.options
        signed = sigv4_headers(
            "PUT",
            url,
            b"",
            access_key=options.access_key_id,
            secret_key=options.secret_access_key,
            region=options.region,
            session_token=options.session_token,
            headers=headers,
        )
        try:
            response = self._http.put(url, headers=signed)
        except httpx.HTTPError as exc:
            raise self.error(exc, "set the metadata of", key) from exc
        # CopyObject may fail after its 200 has begun: the error then comes in the body.
        if response.status_code != 200 or b"<Error>" in response.content:
            denied = response.status_code in (401, 403)
            raise self.error(response.text, "set the metadata of", key, denied=denied)

    def error(
        self,
        problem: BaseException | str,
        doing: str,
        key: str | None = None,
        denied: bool = False,
    ) -> SinkError:
        """A SinkError whose reason a person can act on; `unavailable` if no file can be stored.

        `doing` completes "could not …" (with `key`'s location, else the prefix's).
        """
        text = str(problem)
        denied = denied or isinstance(problem, PermissionDeniedError | UnauthenticatedError)
        match = _S3_ERROR.search(text)
        code = match.group(1) if match else None
        where = f"s3://{self.bucket}/{self.prefix}"
        what = f"s3://{self.bucket}/{key}" if key else where
        if code in _CREDENTIALS:
            return SinkError(
                where,
                f"S3 at {self.endpoint} refused the credentials ({code}): "
                "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN",
                unavailable=True,
            )
        if code == "NoSuchBucket":
            return SinkError(
                where,
                f"bucket {self.bucket} does not exist at {self.endpoint}: "
                "create it, or correct STORAGE_URL",
                unavailable=True,
            )
        if denied or code == "AccessDenied":
            return SinkError(
                where,
                f"S3 at {self.endpoint} does not let these credentials {doing} {what} "
                f"({code or 'HTTP 403'}): they need s3:PutObject and s3:GetObject on {where}*",
                unavailable=True,
            )
        if code is None and isinstance(problem, httpx.TransportError | BaseError):
            if _unreachable(text):
                cause = _brief(text).rpartition(" - ")[2]
                return SinkError(
                    where, f"cannot reach S3 at {self.endpoint}: {cause}", unavailable=True
                )
        detail = f"{code}: {match.group(2) or ''}".rstrip(": ") if match else _brief(text)
        return SinkError(what, f"S3 could not {doing} {what}: {detail}")

    def _object_url(self, key: str) -> httpx.URL:
        path = quote(key, safe="/-_.~")
        if self.options.path_style:
            return httpx.URL(f"{self.endpoint}/{self.bucket}/{path}")
        parts = urlsplit(self.endpoint)
        return httpx.URL(f"{parts.scheme}://{self.bucket}.{parts.netloc}/{path}")


class S3Writer:
    """One download on its way into the bucket. S3 cannot resume, so it always starts at 0."""

    def __init__(self, sink: S3Sink, stem: str) -> None:
        key_parts(stem)
        self._sink = sink
        self._stem = stem
        self._key: str | None = None
        self._content_type = "application/octet-stream"
        self._validator: str | None = None
        self._held = bytearray()  # the body while it still fits in one PUT
        self._size = 0
        self._stored: dict[str, Any] | None = None  # the sidecar of the same file, already there
        self._upload: _Upload | None = None
        self._scratch = memoryview(bytearray(READ_SIZE))  # reads copied or only hashed

    @property
    def offset(self) -> int:
        return 0

    @property
    def validator(self) -> str | None:
        return self._validator

    def hasher(self) -> hashlib._Hash:
        return hashlib.sha256()

    def head(self, size: int) -> bytes:
        """Nothing: an S3 writer holds no bytes from an earlier attempt."""
        return b""

    def restart(self, validator: str | None) -> None:
        self._stop()
        self._validator = validator
        self._held = bytearray()
        self._size = 0

    def begin(self, content_type: str | None, final_url: str, size: int | None) -> None:
        """Name the object, and look for the same file stored before."""
        self._key = self._sink.object_key(self._stem + extension(content_type, final_url))
        self._content_type = content_type or "application/octet-stream"
        self._stored = self._sink.stored(self._key, size)

    def buffer(self) -> memoryview:
        """Where the next read goes: while the upload streams, a buffer obstore may keep."""
        lent = self._upload.lend() if self._upload is not None else None
        return self._scratch if lent is None else lent

    def write(self, data: memoryview) -> None:
        self._size += len(data)
        if self._stored is not None:
            return  # the download is only hashed (by fetch) to compare with the stored file
        if self._upload is not None:
            self._upload.send(data)
            return
        self._held += data
        if len(self._held) > self._sink.options.part_size:
            assert self._key is not None, "begin() names the object before the first write"
            self._upload = _Upload(self._sink, self._key, self._content_type, self._held)
            self._held = bytearray()

    def commit(self, key: str, sidecar: dict[str, Any]) -> str:
        """Complete the object as `key` once the sidecar's `size` matches; write the sidecar.

        The sidecar carries the download's `sha256` and `size`.
        """
        sink = self._sink
        full = sink.object_key(key)
        location = f"s3://{sink.bucket}/{full}"
        if full != self._key:
            self._stop()
            raise SinkError(location, f"the download began as {self._key}, not {full}", retry=False)
        sha256, size = str(sidecar["sha256"]), int(sidecar["size"])
        if size != self._size:
            self._stop()
            raise SinkError(location, f"{self._size} bytes were written, not {size}")
        if self._stored is not None:
            if self._stored["sha256"] == sha256:
                return location
            sink.replace(full, True)
            raise SinkError(
                location,
                f"{location} holds other bytes (sha256 {self._stored['sha256']}); "
                "the next attempt uploads this download over them",
            )
        if self._upload is None:
            attributes: Attributes = {"Content-Type": self._content_type, "sha256": sha256}
            sink.put(full, self._held, attributes)
        else:
            etag = self._upload.finish()
            self._upload = None
            sink.set_metadata(full, etag, self._content_type, sha256, size)
        note = json.dumps(sidecar, indent=2, sort_keys=True).encode()
        sink.put(full + ".json", note, {"Content-Type": "application/json"})
        sink.replace(full, False)
        return location

    def close(self) -> None:
        """Stop: an unfinished upload is aborted (S3 keeps nothing to resume from)."""
        self._stop()

    def discard(self) -> None:
        """Stop and drop everything written."""
        self._stop()
        self._held = bytearray()

    def _stop(self) -> None:
        if self._upload is not None:
            self._upload.abort()
            self._upload = None


class _Aborted(Exception):
    """Raised inside the upload's source so that obstore aborts the multipart upload."""


_Chunk = bytes | bytearray | memoryview


class _Upload:
    """A multipart upload in a thread of its own, fed chunk by chunk by the download thread.

    Full buffers it lent go to obstore without a copy. obstore (0.12: pyo3-bytes) takes
    each chunk through the buffer protocol, holds that export until its part is sent, and
    reads the bytes only through it; until then the chunk's memoryview refuses
    `release()`, which is how `_reclaim` knows a buffer is free again. Should obstore hold
    more chunks than its parts in flight explain, reads are copied again rather than
    lent: memory and the search for a free buffer stay bounded.
    """

    def __init__(self, sink: S3Sink, key: str, content_type: str, first: bytearray) -> None:
        self._sink = sink
        self._key = key
        self._queue: queue.Queue[_Chunk | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._lent: bytearray | None = None  # the buffer of the read in progress
        # What obstore may hold at once: the parts in flight and the one it fills (a part
        # touches at most one read more than it spans, as parts need not start where reads
        # do), and one part more for slack.
        options = sink.options
        per_part = -(-options.part_size // READ_SIZE) + 1
        self._most_taken = (options.upload_concurrency + 2) * per_part
        # Chunks obstore has taken, oldest first; appended by the upload thread, reclaimed
        # by the download thread (single deque operations are atomic).
        self._taken: collections.deque[memoryview] = collections.deque()
        self._aborted = threading.Event()
        self._etag: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(first, content_type), name=f"s3-upload {key}", daemon=True
        )
        self._thread.start()

    def _run(self, first: bytearray, content_type: str) -> None:
        try:
            self._etag = self._sink.upload(self._key, self._chunks(first), content_type)
        except BaseException as exc:  # handed to the download thread, which raises it
            self._error = exc

    def _chunks(self, first: bytearray) -> Iterator[_Chunk]:
        yield first
        while True:
            chunk = self._queue.get()
            if self._aborted.is_set():
                raise _Aborted("the download stopped")
            if chunk is None:
                return
            yield chunk
            if isinstance(chunk, memoryview):
                self._taken.append(chunk)  # obstore took it before asking for the next one

    def lend(self) -> memoryview | None:
        """A buffer for the next read: the last one if it was not kept, else one obstore
        has let go of, else a new one; None (read elsewhere, and copy) while obstore holds
        as many as it may."""
        if self._lent is None:
            self._lent = self._reclaim()
            if self._lent is None and len(self._taken) < self._most_taken:
                self._lent = bytearray(READ_SIZE)
        return None if self._lent is None else memoryview(self._lent)

    def _reclaim(self) -> bytearray | None:
        taken = self._taken
        for index in range(len(taken)):  # oldest first: parts mostly finish in order
            chunk = taken[index]
            base = chunk.obj
            try:
                chunk.release()  # BufferError while obstore still holds the chunk
            except BufferError:
                continue
            del taken[index]
            assert isinstance(base, bytearray)
            return base
        return None

    def send(self, data: memoryview) -> None:
        """Queue the bytes of a read: as they are if they fill a buffer this upload lent,
        else a copy (a short read, or bytes from elsewhere)."""
        if data.obj is self._lent and data.nbytes == READ_SIZE:
            self._lent = None  # obstore's now; `lend` lends another
            self._put(data)
        else:
            self._put(bytes(data))

    def _put(self, chunk: _Chunk | None) -> None:
        """Queue a chunk (None: the end), unless the upload already failed."""
        while True:
            if self._error is not None or not self._thread.is_alive():
                raise self._failure()
            try:
                self._queue.put(chunk, timeout=0.5)
            except queue.Full:
                continue
            return

    def finish(self) -> str | None:
        """Complete the upload; its ETag."""
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise self._failure()
        return self._etag

    def abort(self) -> None:
        """Make the source raise, so that obstore aborts the upload, and wait for it."""
        self._aborted.set()
        while True:  # the source may be waiting for a chunk: wake it
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(_STOP_SECONDS)
        if self._thread.is_alive():
            log.warning("an aborted upload is still running", extra={"key": self._key})

    def _failure(self) -> SinkError:
        error = self._error
        if error is None:
            return SinkError(self._key, "the upload stopped without an error")
        if isinstance(error, SinkError):
            return error
        return self._sink.error(error, "upload to", self._key)


def _unreachable(text: str) -> bool:
    lowered = text.lower()
    return any(sign in lowered for sign in ("error sending request", "connect", "timed out", "dns"))


def _brief(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "no detail"
    return first if len(first) <= 300 else first[:297] + "..."
