"""The media server's request log says which answers delivered a whole file."""

from __future__ import annotations

import http.client

from tests.media_server import Cut, MediaServer, Serve, Status, media_bytes


def get(media: MediaServer, path: str, headers: dict[str, str] | None = None) -> bytes:
    host, port = media.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        try:
            return connection.getresponse().read()
        except http.client.IncompleteRead as exc:
            return exc.partial
    finally:
        connection.close()


def test_a_whole_answer_reaches_the_end_and_a_cut_one_does_not(media: MediaServer) -> None:
    """A full 200 and a 206 that ends the file reach its end; a cut body and an error do not."""
    body = media_bytes(10_000, "log")
    media.add("/log.mp4", body, [Cut(4000), Serve(), Serve(), Status(503)])

    assert get(media, "/log.mp4") == body[:4000]
    assert get(media, "/log.mp4") == body
    etag = media.routes["/log.mp4"].etag
    assert get(media, "/log.mp4", {"Range": "bytes=4000-", "If-Range": etag}) == body[4000:]
    get(media, "/log.mp4")

    cut, whole, resumed, refused = media.hits("/log.mp4")
    assert (cut.status, cut.first_byte, cut.sent) == (200, 0, 4000)
    assert (whole.status, whole.first_byte, whole.sent) == (200, 0, 10_000)
    assert (resumed.status, resumed.first_byte, resumed.sent) == (206, 4000, 6000)
    assert refused.status == 503
    assert [hit.reached_end(len(body)) for hit in (cut, whole, resumed, refused)] == [
        False,
        True,
        True,
        False,
    ]
