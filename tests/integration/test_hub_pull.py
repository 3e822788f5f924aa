"""`appliance models pull` against a local hub mirror (HF_ENDPOINT), then serving what it pulled.

The mirror (tests/hub_mirror.py) serves the tiny models as hub repositories. Locally, a pull is
interrupted with Ctrl-C in the middle of a file and run again: the files already complete are
not fetched twice, a connection dropped part-way resumes with a Range request, and the bytes in
the cache are the source's. Remotely, the appliance pulls into its own cache with progress
streamed to the CLI, then loads the model from there and serves it; a gated or missing id is one
line on stderr and exit code 1. Every cache is a temporary HF_HOME: the shared one is untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from openai import OpenAI

from tests.hub_mirror import HubMirror, MirroredRepo, repo_from_folder
from tests.integration.harness import (
    MODELS_DIR,
    REPO,
    START_DEADLINE,
    ApplianceProcess,
    wait_until,
)

pytestmark = pytest.mark.integration

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes a download to disk in chunks of this size
# A data file bigger than one write chunk, so that a connection dropped part-way leaves whole
# chunks on disk for the Range request to resume from. vLLM never reads it.
LARGE = bytes(range(256)) * (CHUNK * 2 // 256)
CHAT = "test-org/tiny-llama"
GATED = "test-org/licensed-llama"
FRESH = "test-org/tiny-mistral"  # loaded on demand with no pull first: it downloads


@pytest.fixture(scope="module")
def mirror() -> Iterator[HubMirror]:
    """The tiny Llama as an open repository (plus a large data file) and as a gated one."""
    files = repo_from_folder(MODELS_DIR / "tiny-llama", {"data/large.dat": LARGE})
    repos = {
        CHAT: MirroredRepo(files=files, commit="1" * 40),
        GATED: MirroredRepo(files=files, commit="2" * 40, gated_token="hf_licensed"),
        FRESH: MirroredRepo(files=repo_from_folder(MODELS_DIR / "tiny-mistral"), commit="3" * 40),
    }
    with HubMirror(repos) as server:
        yield server


def hub_env(mirror: HubMirror, home: Path) -> dict[str, str]:
    """Online through the mirror, with a cache of this test's own; no token."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=mirror.url, HF_HOME=str(home), PYTHONPATH=str(REPO), COLUMNS="200")
    # A stalled transfer stays stalled until the test releases it (the default read timeout,
    # 10 s, would end it by itself on a busy machine).
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "300"
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`appliance ...` in a subprocess, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    """Wait for ``proc``; its exit code and everything it printed."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout + stderr


def test_pull_interrupted_mid_file_then_resumed(mirror: HubMirror, tmp_path: Path) -> None:
    env = hub_env(mirror, tmp_path / "hf")
    mirror.controls.stall[(CHAT, "data/large.dat")] = CHUNK + 1024
    first = cli("models", "pull", CHAT, "--local", env=env)
    assert mirror.controls.stalled.wait(60), "the pull never reached the large file"
    first.send_signal(signal.SIGINT)  # Ctrl-C in the middle of data/large.dat
    code, printed = finish(first, timeout=30)
    mirror.controls.release.set()
    assert code == 130, printed
    assert "run the same command again to resume" in printed

    # The second run: a connection dropped part-way through the large file resumes by Range.
    mirror.controls.drop_once[(CHAT, "data/large.dat")] = CHUNK + 4096
    code, printed = finish(cli("models", "pull", CHAT, "--local", env=env))
    assert code == 0, printed
    assert f"pulling {CHAT}: 8 files" in printed
    assert "model.safetensors" in printed and f"pulled {CHAT}" in printed
    # Files finished before Ctrl-C were not fetched again.
    assert len(mirror.gets(CHAT, "chat_template.jinja")) == 1
    assert len(mirror.gets(CHAT, "config.json")) == 1
    large = mirror.gets(CHAT, "data/large.dat")
    assert [g.status for g in large] == [200, 200, 206], large
    assert large[-1].range == f"bytes={CHUNK}-"
    snapshot = tmp_path / "hf/hub/models--test-org--tiny-llama/snapshots" / ("1" * 40)
    assert (snapshot / "data/large.dat").read_bytes() == LARGE
    source = MODELS_DIR / "tiny-llama/model.safetensors"
    assert (snapshot / "model.safetensors").read_bytes() == source.read_bytes()

    # Pulled already: nothing to fetch.
    code, printed = finish(cli("models", "pull", CHAT, "--local", env=env))
    assert code == 0 and "(8 already on disk)" in printed, printed


@pytest.mark.parametrize(
    ("hub_id", "expected"),
    [(GATED, "is gated"), ("test-org/no-such-model", "no model test-org/no-such-model")],
)
def test_gated_or_missing_is_one_line_and_exit_1(
    mirror: HubMirror, tmp_path: Path, hub_id: str, expected: str
) -> None:
    code, printed = finish(cli("models", "pull", hub_id, "--local", env=hub_env(mirror, tmp_path)))
    assert code == 1
    assert printed.strip().count("\n") == 0, printed
    assert printed.startswith("error: ") and expected in printed


class HubAppliance(ApplianceProcess):
    """An appliance online through the mirror, with its own hub cache."""

    def __init__(self, workdir: Path, mirror: HubMirror) -> None:
        chat = {
            "name": "pulled-chat",
            "source": CHAT,
            "autoload": False,
            "resources": {"memory_gib": 1},
            "engine": {"max_model_len": 512, "dtype": "float32"},
        }
        fresh = {
            **chat,
            "name": "fresh-chat",
            "source": FRESH,
            "load_on_demand": True,
        }
        super().__init__(workdir, [chat, fresh])
        self.hub_env = hub_env(mirror, workdir / "hf")

    def env(self) -> dict[str, str]:
        """The harness's environment, online through the mirror."""
        env = super().env()
        env.pop("HF_HUB_OFFLINE")
        env.update(self.hub_env)
        return env


def model_state(appliance: ApplianceProcess, name: str) -> str:
    """The model's state in GET /admin/models."""
    body = httpx.get(f"{appliance.url}/admin/models/{name}/status", timeout=10).json()
    return str(body["state"])


def log_events(appliance: ApplianceProcess, event: str) -> list[dict[str, Any]]:
    """The appliance's JSON log lines of one event kind."""
    found = []
    for line in appliance.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            found.append(json.loads(line))
    return found


def on_disk(env: dict[str, str], name: str) -> str:
    """The row of `models list` for ``name``."""
    code, printed = finish(cli("models", "list", env=env))
    assert code == 0, printed
    return next(line for line in printed.splitlines() if name in line).strip(" │")


def test_remote_pull_then_load_and_serve(mirror: HubMirror, tmp_path: Path) -> None:
    appliance = HubAppliance(tmp_path, mirror).start("--load-wait", "1")
    try:
        env = {**hub_env(mirror, tmp_path / "cli-hf"), "APPLIANCE_URL": appliance.url}
        assert on_disk(env, "pulled-chat").split()[-1] == "no"
        code, printed = finish(cli("models", "plan", "pulled-chat", env=env))
        assert code == 0, printed
        assert "pulled-chat (unloaded): would load on cpu0" in printed
        assert "evicts: nothing" in printed and "a load downloads them first" in printed
        before = len(mirror.gets(CHAT, "model.safetensors"))
        code, printed = finish(cli("models", "pull", "pulled-chat", env=env))
        assert code == 0, printed
        assert f"pulling {CHAT}: 8 files" in printed and "model.safetensors  5.8 MB" in printed
        # Into the appliance's cache, not this process's.
        assert (tmp_path / "hf/hub/models--test-org--tiny-llama").is_dir()
        assert not (tmp_path / "cli-hf/hub").exists()
        assert "yes, 26.8 MB" in on_disk(env, "pulled-chat")

        code, printed = finish(cli("models", "pull", GATED, env=env))
        assert code == 1 and printed.strip().count("\n") == 0, printed
        assert "is gated" in printed and "(HTTP 400)" in printed
        code, printed = finish(cli("models", "pull", "/etc", env=env))
        assert code == 1 and "not a hub id" in printed, printed

        code, printed = finish(cli("models", "load", "pulled-chat", env=env), timeout=400)
        assert code == 0, printed + appliance.tail()
        client = OpenAI(base_url=f"{appliance.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="pulled-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        # The engine loaded the pulled weights from the cache: fetched once, by the pull.
        assert len(mirror.gets(CHAT, "model.safetensors")) == before + 1

        # What is on disk, and freeing it: refused while loaded, then done.
        assert "yes, 26.8 MB" in on_disk(env, "pulled-chat")
        code, printed = finish(cli("models", "rm", "pulled-chat", env=env))
        assert code == 1 and "pulled-chat is ready" in printed and "unload it first" in printed
        code, printed = finish(cli("models", "unload", "pulled-chat", env=env))
        assert code == 0, printed
        code, printed = finish(cli("models", "rm", "pulled-chat", env=env))
        assert code == 0 and f"{CHAT}: freed 26.8 MB" in printed, printed
        assert not (tmp_path / "hf/hub/models--test-org--tiny-llama").exists()
        assert on_disk(env, "pulled-chat").split()[-1] == "no"

        # Ollama's own client, unchanged, does the same pull and rm (issue 28).
        olla = ollama.Client(host=appliance.url, timeout=120)
        statuses = [part.status for part in olla.pull("pulled-chat:latest", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
        assert "pulling model.safetensors" in statuses and "pulling config.json" in statuses
        assert "yes, 26.8 MB" in on_disk(env, "pulled-chat")
        fetched = len(mirror.gets(CHAT, "model.safetensors"))
        assert olla.pull("pulled-chat").status == "success"  # all there: nothing fetched
        assert len(mirror.gets(CHAT, "model.safetensors")) == fetched
        assert olla.delete("pulled-chat").status == "success"
        assert on_disk(env, "pulled-chat").split()[-1] == "no"
        with pytest.raises(ollama.ResponseError) as caught:
            olla.delete("pulled-chat")
        assert caught.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as caught:
            olla.pull(GATED)
        assert caught.value.status_code == 400 and "is gated" in caught.value.error

        # A model whose files are missing: the first request starts downloading -> loading ->
        # ready; meanwhile 503 with Retry-After, and the progress in models ps and /metrics.
        mirror.controls.release.clear()
        mirror.controls.stalled.clear()
        mirror.controls.stall[(FRESH, "model.safetensors")] = 1024 * 1024
        refused = httpx.post(
            f"{appliance.url}/v1/chat/completions",
            json={"model": "fresh-chat", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "model_downloading"
        assert int(refused.headers["retry-after"]) >= 1
        assert mirror.controls.stalled.wait(30)
        code, printed = finish(cli("models", "ps", env=env))
        assert code == 0 and "downloading" in printed and "of 5.8 MB" in printed, printed
        scraped = httpx.get(f"{appliance.url}/metrics", timeout=10).text
        assert 'appliance_model_download_total_bytes{model="fresh-chat"}' in scraped
        mirror.controls.release.set()  # the cut connection is retried; the download ends
        try:
            wait_until(
                lambda: model_state(appliance, "fresh-chat") in ("ready", "failed"),
                "fresh-chat ready",
                timeout=START_DEADLINE,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; it is {model_state(appliance, 'fresh-chat')}") from exc
        assert model_state(appliance, "fresh-chat") == "ready", appliance.tail()
        reply = client.chat.completions.create(
            model="fresh-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        states = [
            (t["from_state"], t["to_state"])
            for t in log_events(appliance, "model_state")
            if t["model"] == "fresh-chat"
        ]
        assert states == [
            ("unloaded", "downloading"),
            ("downloading", "loading"),
            ("loading", "ready"),
        ]
    finally:
        appliance.stop()
