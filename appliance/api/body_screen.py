"""What a client's model request may not carry to an engine, checked before the engine sees it.

Two things in a vLLM request body reach past the model:

- **Engine-internal fields.** ``features`` (``/inference/v1/generate``'s precomputed
  multimodal data, which vLLM's msgpack decoder would ``pickle.loads`` under
  ``VLLM_ALLOW_INSECURE_SERIALIZATION``), ``kv_transfer_params`` and ``ec_transfer_params``
  (disaggregated serving: what a prefill or encoder node hands a decode node) are meant for
  vLLM's own nodes, not for clients. They are taken out of every body a non-admin key sends,
  at the top level, in ``vllm_xargs`` and in ``sampling_params.extra_args`` (where vLLM also
  reads them, ``v1/request.py``). Admin keys keep them, for an operator's own set-up.
- **Media URLs.** A multimodal model fetches ``image_url``, ``audio_url``, ``video_url`` (and
  the Responses and Messages APIs' forms) itself, from the appliance's process
  (``vllm/multimodal/media/connector.py``), from any address unless ``allowed_media_domains``
  is set. So every http(s) URL in a body is resolved here first and refused unless every
  address it resolves to is a public internet address (or in ``media_url_networks``); vLLM is
  told not to follow redirects (``VLLM_MEDIA_URL_ALLOW_REDIRECTS=0``, set at start), so a
  public URL cannot hand the fetch on to an internal one. And when such a request fails, the
  client gets one answer whatever happened (a 404, a refused connection, a timeout and an
  undecodable file read the same), so it cannot map what answers where.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from appliance.catalogue.trust import IPAddress, Resolver, refused_address, resolve_host
from appliance.engines.base import JSONReply, Reply
from appliance.errors import InvalidRequestError, envelope

INTERNAL_FIELDS = ("features", "kv_transfer_params", "ec_transfer_params")
"""Fields of vLLM's request models that only vLLM's own nodes should send."""

MEDIA_URL_KEYS = frozenset({"url", "image_url", "audio_url", "video_url", "file_url"})
"""Keys under which vLLM's content parts carry a URL string: ``{"image_url": {"url": ...}}``
(chat), ``{"type": "input_image", "image_url": ...}`` (Responses), ``{"source": {"type":
"url", "url": ...}}`` (Messages)."""

MAX_MEDIA_URLS = 32
"""Media URLs one request may name: each costs a DNS lookup here and a fetch in the engine."""

MEDIA_RESOLVE_TIMEOUT_SECONDS = 3.0

# A plain http(s) URL: no user-info, no backslash, no spaces; anything else is refused rather
# than parsed, so this check and vLLM's fetcher cannot read a different host out of one URL.
_PLAIN_URL = re.compile(
    r"^https?://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
    r"(?:[/?#][^\s\\@]*)?$",
    re.IGNORECASE,
)

# What a 400 that the media fetch (or decoding what it fetched) caused talks about.
_ABOUT_MEDIA = re.compile(
    rb"media|url|fetch|connect|image|audio|video|decode|identify|host", re.IGNORECASE
)

MEDIA_FETCH_FAILED = (
    "a media URL in the request could not be fetched or read; give a public http(s) URL of "
    "an image, audio or video file, or a data: URL"
)


class MediaUrlRefusedError(InvalidRequestError):
    """A media URL names an address the engine may not fetch from (internal, malformed)."""

    code = "media_url_refused"


def strip_internal_fields(body: MutableMapping[str, Any]) -> bool:
    """Take ``INTERNAL_FIELDS`` out of ``body`` (and its ``vllm_xargs`` and
    ``sampling_params.extra_args``); whether anything was taken out."""
    holders: list[MutableMapping[str, Any]] = [body]
    for outer, inner in (("vllm_xargs", None), ("sampling_params", "extra_args")):
        holder = body.get(outer)
        if inner is not None and isinstance(holder, dict):
            holder = holder.get(inner)
        if isinstance(holder, dict):
            holders.append(holder)
    stripped = False
    for holder in holders:
        for name in INTERNAL_FIELDS:
            if name in holder:
                del holder[name]
                stripped = True
    return stripped


def media_urls(body: dict[str, Any]) -> list[str]:
    """Every http(s) URL string under one of ``MEDIA_URL_KEYS`` anywhere in ``body`` (but its
    ``metadata``, which is the client's own notes). ``data:`` URLs are left alone (nothing is
    fetched) and so are ``file:`` ones (vLLM refuses them unless the operator set
    ``allowed_local_media_path``). The body's depth is already bounded by the JSON reader."""
    found: list[str] = []
    stack: list[Any] = [v for k, v in body.items() if k != "metadata"]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in MEDIA_URL_KEYS and isinstance(value, str):
                    if value.strip()[:5].lower() not in ("data:", "file:"):
                        found.append(value)
                else:
                    stack.append(value)
    return found


@dataclass(frozen=True)
class Screened:
    """What screening did to a body: ``changed`` (fields were taken out: re-encode it) and
    ``fetches_media`` (pass the engine's reply through :meth:`BodyScreen.reply`)."""

    changed: bool
    fetches_media: bool


class BodyScreen:
    """Screens model request bodies: internal fields out, media URLs checked."""

    def __init__(
        self,
        media_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        *,
        resolve: Resolver = resolve_host,
    ) -> None:
        """``media_networks``: addresses media URLs may resolve to although they are not
        public (the operator's LAN image server, say); ``resolve`` is injectable for tests."""
        self._networks = tuple(media_networks)
        self._resolve = resolve

    async def check(self, body: dict[str, Any], *, admin: bool) -> Screened:
        """Screen ``body`` in place (internal fields out unless ``admin``; media URLs
        checked for everyone: an admin's request fetches from the box as well).

        Raises:
            MediaUrlRefusedError: a media URL is malformed, or its host resolves to an
                address that is not public (or does not resolve); the message is the same
                for each reason, and names which URL of the request it was.
        """
        changed = not admin and strip_internal_fields(body)
        urls = media_urls(body)
        if len(urls) > MAX_MEDIA_URLS:
            raise MediaUrlRefusedError(
                f"the request names {len(urls)} media URLs; at most {MAX_MEDIA_URLS} are allowed"
            )
        await asyncio.gather(*(self._check_url(i, url) for i, url in enumerate(urls)))
        return Screened(changed=changed, fetches_media=bool(urls))

    def reply(self, reply: Reply | None, *, admin: bool) -> Reply | None:
        """``reply`` to a request that named media URLs, as the client may see it: an error
        the fetch may have caused becomes one 400 that does not say what the fetch met
        (admins see the engine's own). vLLM answers a 4xx from the media server with 422, a
        refused connection or a timeout with a 5xx, content that is no image with a 400
        naming it; a 400 about anything else (a bad ``temperature``) is left as it is."""
        if admin or not isinstance(reply, JSONReply) or reply.status_code < 400:
            return reply
        status = reply.status_code
        if status == 400 and not _ABOUT_MEDIA.search(reply.body[:4096]):
            return reply
        body = envelope(MEDIA_FETCH_FAILED, "invalid_request_error", "media_fetch_failed")
        return JSONReply(400, json.dumps(body).encode())

    async def _check_url(self, index: int, url: str) -> None:
        refused = MediaUrlRefusedError(
            f"media URL {index + 1} of the request is refused: it must be a plain http(s) URL "
            "whose host resolves to public internet addresses only"
        )
        match = _PLAIN_URL.match(url.strip())
        if match is None:
            raise refused
        host = match["host"].strip("[]")
        port = int(match["port"] or (443 if url.strip()[:5].lower() == "https" else 80))
        try:
            addresses = await asyncio.wait_for(
                self._resolve(host, port), MEDIA_RESOLVE_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError, UnicodeError):
            raise refused from None
        if not addresses or any(self._refused(text) for text in addresses):
            raise refused

    def _refused(self, text: str) -> bool:
        try:
            address: IPAddress = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        # Loopback, link-local, metadata and the like always; private ranges (and anything
        # else that is not a global address: CGNAT, documentation, ...) unless allowed.
        if refused_address(address, ()) is not None:
            return True
        return not address.is_global and not any(address in net for net in self._networks)
