"""A local server that speaks the Hugging Face hub's file protocol, as an offline mirror does.

It serves folders (the tiny models in ``.models/``) as hub repositories, reached by
huggingface_hub and vLLM through ``HF_ENDPOINT``: the revision API (``/api/models/{id}`` and
``/api/models/{id}/revision/{rev}``), the tree API (``/api/models/{id}/tree/{rev}``), and
``/{id}/resolve/{rev}/{file}`` with the hub's metadata headers on HEAD (``X-Repo-Commit``,
``ETag``, ``Content-Length``) and Range requests on GET. A gated repository answers as the hub
does (``X-Error-Code: GatedRepo``) unless the request carries its token.

Tests steer it to cut a download part-way: ``drop_once`` closes the connection after N bytes
(a dropped link), ``stall`` sends N bytes and then holds the connection until released (so a
test can interrupt the client mid-file). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class MirroredRepo:
    """One repository: its files (path -> bytes), commit, and the token it needs if gated."""

    files: dict[str, bytes]
    commit: str
    gated_token: str | None = None


@dataclass(frozen=True)
class SeenRequest:
    """What the mirror was asked: method, repository file (or API path), Range, status."""

    method: str
    path: str
    range: str | None
    status: int


@dataclass
class MirrorControls:
    """Faults to inject, keyed by (repo id, file path); each applies to one GET."""

    drop_once: dict[tuple[str, str], int] = field(default_factory=dict)
    stall: dict[tuple[str, str], int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)


def repo_from_folder(folder: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every file of ``folder`` (recursively) as repository files, plus ``extra`` ones."""
    files = {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    files.update(extra or {})
    return files


class HubMirror:
    """The mirror, on a free loopback port in a background thread (``with HubMirror(...)``)."""

    def __init__(self, repos: dict[str, MirroredRepo]) -> None:
        self.repos = repos
        self.controls = MirrorControls()
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubMirror:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.controls.release.set()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, repo_id: str, path: str) -> list[SeenRequest]:
        """The GETs of one repository file so far."""
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and s.path == f"{repo_id}/{path}"]

    def _record(self, seen: SeenRequest) -> None:
        with self._lock:
            self.seen.append(seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:  # quiet: tests read ``seen``
                return None

            def do_GET(self) -> None:
                self._route(head=False)

            def do_HEAD(self) -> None:
                self._route(head=True)

            def _route(self, *, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if tree:
                    self._tree(tree.group(1), tree.group(3) or "")
                elif api:
                    self._info(api.group(1))
                elif resolve:
                    self._file(resolve.group(1), resolve.group(3), head=head)
                else:
                    self._error(404, "EntryNotFound", f"no route {path}")

            def _repo(self, repo_id: str) -> MirroredRepo | None:
                repo = mirror.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    return None
                token = self.headers.get("Authorization")
                if repo.gated_token is not None and token != f"Bearer {repo.gated_token}":
                    self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
                    return None
                return repo

            def _info(self, repo_id: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                self._json(
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": repo.commit,
                        "private": False,
                        "gated": repo.gated_token is not None,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                    }
                )

            def _tree(self, repo_id: str, under: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                prefix = f"{under.rstrip('/')}/" if under else ""
                entries = [
                    {
                        "type": "file",
                        "path": name,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }
                    for name, data in sorted(repo.files.items())
                    if name.startswith(prefix)
                ]
                self._json(entries)

            def _file(self, repo_id: str, name: str, *, head: bool) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                data = repo.files.get(name)
                if data is None:
                    self._error(404, "EntryNotFound", f"{name} not in {repo_id}")
                    return
                start, end = 0, len(data)
                wanted = self.headers.get("Range")
                status = 200
                if wanted and not head:
                    match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                    if match is None or int(match.group(1)) >= len(data):
                        self._error(416, "RangeNotSatisfiable", wanted or "")
                        return
                    start, status = int(match.group(1)), 206
                    if match.group(2):
                        end = min(end, int(match.group(2)) + 1)
                mirror._record(SeenRequest(self.command, f"{repo_id}/{name}", wanted, status))
                self.send_response(status)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                key = (repo_id, name)
                body = data[start:end]
                cut = mirror.controls.drop_once.pop(key, None)
                held = mirror.controls.stall.pop(key, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if held is not None:
                    self.wfile.write(body[:held])
                    self.wfile.flush()
                    mirror.controls.stalled.set()
                    mirror.controls.release.wait(120)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _json(self, body: object) -> None:
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)

            def _error(self, status: int, code: str, message: str) -> None:
                mirror._record(SeenRequest(self.command, self.path, None, status))
                raw = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)

        return Handler
