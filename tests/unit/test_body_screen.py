"""What a client body may not carry to an engine (issue 25, part B): engine-internal fields
and media URLs that point inside the box or its LAN. Tried as a user key would, through the
whole app on a test engine that records what reached it; everyone else is still served."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.body_screen import (
    BodyScreen,
    MediaUrlRefusedError,
    media_urls,
    strip_internal_fields,
)
from appliance.api_keys import ApiKey, AuthConfig, Role
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.host.inventory import cpu_inventory
from appliance.settings import Settings
from tests.fakes import EchoEngine
from tests.unit.test_app_fast import EchoMaker

ADMIN_KEY = "sk-admin-" + "a" * 32
USER_KEY = "sk-user-" + "u" * 32
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}


class RecordingEngine(EchoEngine):
    """Keeps every body it is given; ``fail`` makes it answer as vLLM does when a media
    fetch fails (a 500 that names what answered)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.fail = False

    def _reply(self) -> JSONReply:
        if self.fail:
            body = {"error": {"message": "Cannot connect to host 10.0.0.5:80", "code": 500}}
            return JSONReply(500, json.dumps(body).encode())
        return JSONReply(200, b'{"object": "x"}')

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        self.bodies.append(body)
        return self._reply()


class RecordingMaker(EchoMaker):
    def create(self, spec: Any, allocation: Any, inventory: Any) -> RecordingEngine:
        self.made.append(RecordingEngine())
        return self.made[-1]  # type: ignore[return-value]


def _client(tmp_path: Path, **settings: Any) -> Iterator[tuple[TestClient, RecordingMaker]]:
    config = tmp_path / "models.yaml"
    entry = {"name": "chat", "source": "org/chat", "resources": {"memory_gib": 1}}
    config.write_text(yaml.safe_dump({"models": [entry]}))
    keys = [
        ApiKey.model_validate({"name": "ops", "key": ADMIN_KEY, "role": Role.ADMIN}),
        ApiKey.model_validate({"name": "alice", "key": USER_KEY}),
    ]
    settings.setdefault("auth", AuthConfig(keys=keys))
    maker = RecordingMaker()
    app = create_app(
        Settings(
            config_path=config,
            cpu_memory_budget_gib=4,
            allowed_hosts=["*"],
            status_page=False,
            usage_db=tmp_path / "usage.db",
            **settings,
        ),
        engines=maker,
        inventory=cpu_inventory(4),
    )
    with TestClient(app) as client:
        client.portal.call(app.state.appliance.supervisor.wait_autoload)
        yield client, maker


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, RecordingMaker]]:
    yield from _client(tmp_path)


def image(url: str) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return {"model": "chat", "messages": [{"role": "user", "content": content}]}


INTERNAL = {
    "features": {"mm_hashes": {"image": ["x"]}, "kwargs_data": {"image": ["gASV..."]}},
    "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.9"},
    "ec_transfer_params": {"remote": "10.0.0.9"},
}


def test_a_user_key_cannot_hand_the_engine_its_internal_fields(
    served: tuple[TestClient, RecordingMaker],
) -> None:
    client, maker = served
    generate = {
        "model": "chat",
        "token_ids": [1, 2, 3],
        "sampling_params": {"max_tokens": 2, "extra_args": {"kv_transfer_params": {"a": 1}}},
        **INTERNAL,
    }
    assert client.post("/inference/v1/generate", json=generate, headers=USER).status_code == 200
    seen = maker.made[0].bodies[-1]
    assert not set(INTERNAL) & set(seen)
    assert seen["sampling_params"] == {"max_tokens": 2, "extra_args": {}}
    assert seen["token_ids"] == [1, 2, 3]

    chat = {
        **image("data:image/png;base64,AAAA"),
        **INTERNAL,
        "vllm_xargs": {"ec_transfer_params": "x", "k": 1},
    }
    assert client.post("/v1/chat/completions", json=chat, headers=USER).status_code == 200
    seen = maker.made[0].bodies[-1]
    assert not set(INTERNAL) & set(seen) and seen["vllm_xargs"] == {"k": 1}

    # The operator's own set-up (an admin key) keeps them.
    assert client.post("/inference/v1/generate", json=generate, headers=ADMIN).status_code == 200
    assert set(INTERNAL) <= set(maker.made[0].bodies[-1])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/admin/models",
        "http://localhost/x.png",
        "http://2130706433/x.png",  # 127.0.0.1 written as one number
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/x.png",  # a private range: off unless the operator opens it
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",  # carrier-grade NAT
        "http://0.0.0.0/x.png",
        "http://user:pw@93.184.216.34/x.png",  # user-info: parsers disagree on the host
        "http://93.184.216.34\\@127.0.0.1/x.png",
        "gopher://93.184.216.34/x",
    ],
)
def test_a_media_url_inside_the_box_or_its_lan_is_refused(
    served: tuple[TestClient, RecordingMaker], url: str
) -> None:
    client, maker = served
    before = len(maker.made[0].bodies)
    refused = client.post("/v1/chat/completions", json=image(url), headers=USER)
    assert refused.status_code == 400, url
    error = refused.json()["error"]
    assert error["code"] == "media_url_refused"
    # One message whatever the reason: nothing about what the address is or answered.
    assert "media URL 1 of the request is refused" in error["message"]
    assert len(maker.made[0].bodies) == before  # the engine never saw it
    # Others are still served, and so is this key with a public address.
    fine = client.post(
        "/v1/chat/completions", json=image("http://93.184.216.34/x.png"), headers=USER
    )
    assert fine.status_code == 200


def test_every_api_shape_of_a_media_url_is_checked(
    served: tuple[TestClient, RecordingMaker],
) -> None:
    client, _ = served
    inner = "http://127.0.0.1/x"
    bodies = {
        "/v1/responses": {
            "model": "chat",
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": inner}]}],
        },
        "/v1/messages": {
            "model": "chat",
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": inner}}],
                }
            ],
        },
        "/inference/v1/generate": {
            "model": "chat",
            "token_ids": [1],
            "sampling_params": {},
            "content_parts": [{"type": "audio_url", "audio_url": {"url": inner}}],
        },
        "/v1/chat/completions/batch": {
            "model": "chat",
            "messages": [
                [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": inner}}]}]
            ],
        },
    }
    for path, body in bodies.items():
        reply = client.post(path, json=body, headers=USER)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "media_url_refused", (
            path
        )


def test_a_failed_fetch_says_nothing_of_what_answered(
    served: tuple[TestClient, RecordingMaker],
) -> None:
    client, maker = served
    maker.made[0].fail = True
    reply = client.post(
        "/v1/chat/completions", json=image("http://93.184.216.34/x.png"), headers=USER
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "media_fetch_failed" and "10.0.0.5" not in error["message"]
    # A 404 (422 from vLLM) and undecodable content (a 400 naming it) read the same.
    for status, message in (
        (422, "Failed to fetch media from URL: HTTP 404 error"),
        (400, "cannot identify image file"),
    ):
        reply_body = json.dumps({"error": {"message": message, "code": status}}).encode()
        masked = BodyScreen().reply(JSONReply(status, reply_body), admin=False)
        assert isinstance(masked, JSONReply) and masked.status_code == 400
        assert json.loads(masked.body)["error"]["code"] == "media_fetch_failed"
    # A 400 about something else is the client's to read.
    other = JSONReply(400, b'{"error": {"message": "temperature must be >= 0"}}')
    assert BodyScreen().reply(other, admin=False) is other
    # The operator sees the engine's own answer.
    admin = client.post(
        "/v1/chat/completions", json=image("http://93.184.216.34/x.png"), headers=ADMIN
    )
    assert admin.status_code == 500 and "10.0.0.5" in admin.json()["error"]["message"]


def test_the_operator_may_open_a_private_network_to_media_urls(tmp_path: Path) -> None:
    for client, _maker in _client(tmp_path, media_url_networks=["10.0.0.0/24"]):
        assert (
            client.post(
                "/v1/chat/completions", json=image("http://10.0.0.5/x.png"), headers=USER
            ).status_code
            == 200
        )
        # Not a wider one, and never loopback or metadata.
        for url in ("http://10.0.1.5/x.png", "http://127.0.0.1/x.png", "http://169.254.169.254/"):
            assert (
                client.post("/v1/chat/completions", json=image(url), headers=USER).status_code
                == 400
            )


def test_strip_and_find_on_their_own() -> None:
    body: dict[str, Any] = {"features": 1, "metadata": {"url": "http://127.0.0.1"}}
    assert strip_internal_fields(body) and body == {"metadata": {"url": "http://127.0.0.1"}}
    assert not strip_internal_fields(body)
    assert media_urls(body) == []  # the client's own notes are not fetched
    assert media_urls(
        {"input": [{"image_url": "HTTP://x"}, {"url": "data:,x"}, {"url": "file:///etc/passwd"}]}
    ) == ["HTTP://x"]


def test_too_many_media_urls_are_refused_before_any_lookup() -> None:
    looked_up: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["93.184.216.34"]

    screen = BodyScreen([ipaddress.ip_network("10.0.0.0/8")], resolve=resolve)
    body = {"messages": [{"content": [{"image_url": {"url": f"http://h{i}/"}} for i in range(33)]}]}
    with pytest.raises(MediaUrlRefusedError, match="at most 32"):
        asyncio.run(screen.check(body, admin=False))
    assert looked_up == []
