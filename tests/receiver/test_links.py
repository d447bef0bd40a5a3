"""Short-lived links to archived files, and the API that hands them out."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.links import file_link, open_link
from receiver.settings import Settings
from tests.media_server import MediaServer, media_bytes
from tests.support import ADMIN_TOKEN, fixture_json, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET = "link-secret-0123456789abcdef0123456789"


def test_a_link_names_its_file_until_it_expires() -> None:
    """A fresh link opens to its location; after its time it opens to nothing."""
    token = file_link(SECRET, "/srv/a/0.mp4", 2_000_000_000).removeprefix("/files/")
    assert open_link(SECRET, token, now=1_999_999_999) == "/srv/a/0.mp4"
    assert open_link(SECRET, token, now=2_000_000_001) is None


@pytest.mark.parametrize("change", ["payload", "signature", "secret"])
def test_a_tampered_link_opens_to_nothing(change: str) -> None:
    """Another file, another signature or another secret: the link is refused."""
    token = file_link(SECRET, "/srv/a/0.mp4", 2_000_000_000).removeprefix("/files/")
    payload, sig = token.split(".")
    forged = {
        "payload": file_link(SECRET, "/etc/passwd", 2_000_000_000).split("/")[-1].split(".")[0]
        + "."
        + sig,
        "signature": payload + "." + sig[:-1] + ("A" if sig[-1] != "A" else "B"),
        "secret": token,
    }[change]
    assert open_link(SECRET + ("x" if change == "secret" else ""), forged, now=0) is None


def test_the_api_hands_out_a_link_that_serves_the_stored_file(
    settings: Settings, media: MediaServer, tmp_path: Path
) -> None:
    """A stored asset gets a URL with an expiry that serves its bytes; a bad link is a 404."""
    body = media_bytes(15_000, "archived")
    url = media.add("/linked.mp4", body)
    updated = settings.model_copy(
        update={"download_concurrency": 1, "allow_private_downloads": True}
    )
    data = fixture_json("callback_text2video_succeed.json")
    data["task_result"]["videos"][0]["url"] = url
    task_id = data["task_id"]
    path = tokens.callback_path(
        settings.secret("callback_secret"), tokens.new_channel_ref(), "videos/text2video"
    )
    with TestClient(create_app(updated)) as client:
        assert client.post(path, content=json.dumps(data)).status_code == 200
        wait_for(
            lambda: client.get(f"/api/tasks/{task_id}", headers=ADMIN).json()["archived"],
            "the task to be archived",
        )
        answer = client.get(f"/api/tasks/{task_id}/assets/0/url", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        link = answer.json()
        assert link["url"].startswith(settings.public_url + "/files/")
        assert link["expires_at"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        served = client.get(urlsplit(link["url"]).path)
        assert served.status_code == 200 and served.content == body
        assert client.get(urlsplit(link["url"]).path + "x").status_code == 404
        assert client.get(f"/api/tasks/{task_id}/assets/7/url", headers=ADMIN).status_code == 404
        assert client.get(f"/api/tasks/{task_id}/assets/0/url").status_code == 401


def test_an_asset_not_yet_stored_has_no_link(settings: Settings) -> None:
    """While its download waits, the asset's link is a 409 that says so."""
    data = fixture_json("callback_text2video_succeed.json")
    path = tokens.callback_path(
        settings.secret("callback_secret"), tokens.new_channel_ref(), "videos/text2video"
    )
    with TestClient(create_app(settings)) as client:
        assert client.post(path, content=json.dumps(data)).status_code == 200
        answer = client.get(f"/api/tasks/{data['task_id']}/assets/0/url", headers=ADMIN)
    assert answer.status_code == 409
    assert answer.json()["error"] == "not_stored" and "pending" in answer.json()["message"]


def test_the_link_of_one_file_among_an_outputs_several_names_kind_and_variant(
    settings: Settings, media: MediaServer
) -> None:
    """An audio output's mp3 and wav share index 0: each gets its link by `variant`."""
    files = {"mp3": media_bytes(4200, "a", "mp3"), "wav": media_bytes(4500, "a", "wav")}
    video_body = media_bytes(3600, "v")
    mp3 = media.add("/a.mp3", files["mp3"])
    wav = media.add("/a.wav", files["wav"])
    video = media.add("/v.mp4", video_body)
    task_id = "913827032734650009"
    outputs = [
        {"type": "video", "id": "v", "url": video},
        {"type": "audio", "id": "a", "mp3_url": mp3, "wav_url": wav},
    ]
    body = {"id": task_id, "status": "succeeded", "outputs": outputs}
    updated = settings.model_copy(
        update={"download_concurrency": 1, "allow_private_downloads": True}
    )
    path = tokens.callback_path(
        settings.secret("callback_secret"), tokens.new_channel_ref(), "text-to-video/kling-2.6"
    )
    with TestClient(create_app(updated)) as client:
        assert client.post(path, content=json.dumps(body)).status_code == 200
        wait_for(
            lambda: client.get(f"/api/tasks/{task_id}", headers=ADMIN).json()["archived"],
            "the task to be archived",
        )
        base = f"/api/tasks/{task_id}/assets/0/url"
        main = client.get(base, headers=ADMIN)  # the one file at index 0 without a variant
        assert client.get(urlsplit(main.json()["url"]).path).content == video_body
        vague = client.get(base + "?kind=audio", headers=ADMIN)
        assert vague.status_code == 400
        message = vague.json()["message"]
        assert "kind=audio&variant=mp3" in message and "kind=audio&variant=wav" in message
        for variant, content in files.items():
            answer = client.get(f"{base}?kind=audio&variant={variant}", headers=ADMIN)
            assert answer.status_code == 200, answer.text
            served = client.get(urlsplit(answer.json()["url"]).path)
            assert served.content == content
