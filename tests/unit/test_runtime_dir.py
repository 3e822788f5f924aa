"""The runtime directory (0700, locked while its appliance runs, stale ones removed) and the vLLM
variables refused or set at start."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from pathlib import Path

import pytest
import yaml

from appliance.appliance import Appliance
from appliance.engines.process_env import harden_environment, refuse_unsafe_environment
from appliance.errors import ConfigError
from appliance.host.inventory import cpu_inventory
from appliance.runtime_dir import LOCK_NAME, RuntimeDir, clean_stale
from appliance.settings import Settings
from tests.unit.test_app_fast import EchoMaker


def test_the_runtime_dir_is_private_and_goes_away(tmp_path: Path) -> None:
    runtime = RuntimeDir.create(tmp_path)
    assert stat.S_IMODE(runtime.path.stat().st_mode) == 0o700
    assert runtime.path.name.startswith("appliance-")
    # Held while it runs: the next start leaves it alone.
    assert clean_stale(tmp_path) == [] and runtime.path.is_dir()
    runtime.close()
    assert not runtime.path.exists()


def test_a_killed_appliances_dir_is_removed_at_the_next_start(tmp_path: Path) -> None:
    dead = tmp_path / "appliance-dead1234"
    dead.mkdir(mode=0o700)
    (dead / LOCK_NAME).touch()  # nobody holds the lock: its process is gone
    (dead / "control.sock").touch()
    alive = tmp_path / "appliance-alive123"
    alive.mkdir(mode=0o700)
    fd = os.open(alive / LOCK_NAME, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / "someone-else"
    other.mkdir()
    link = tmp_path / "appliance-link"
    link.symlink_to(other)
    try:
        runtime = RuntimeDir.create(tmp_path)
        assert not dead.exists()
        assert alive.is_dir() and other.is_dir() and link.is_symlink()
        runtime.close()
    finally:
        os.close(fd)


def test_a_dir_from_before_the_lock_goes_only_when_nobody_listens(tmp_path: Path) -> None:
    dead = tmp_path / "appliance-oldstyle"
    dead.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(dead / "control.sock"))  # bound, then closed: refuses connections
    live = tmp_path / "appliance-oldlive"
    live.mkdir(mode=0o700)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live / "owner.sock"))
    listening.listen()
    files = tmp_path / "appliance-notours"
    files.mkdir()
    (files / "notes.txt").write_text("x")
    try:
        now = os.path.getmtime(dead)
        assert clean_stale(tmp_path, now=now) == []  # too young to judge
        assert clean_stale(tmp_path, now=now + 120) == [dead]
        assert live.is_dir() and files.is_dir()
    finally:
        listening.close()


@pytest.mark.parametrize("value", ["1", "true", " 1"])
def test_insecure_serialisation_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": []}))
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", value)
    settings = Settings(config_path=config, cpu_memory_budget_gib=4, usage_db=tmp_path / "u.db")
    with pytest.raises(ConfigError) as refused:
        Appliance(settings, engines=EchoMaker(), inventory=cpu_inventory(4))
    message = refused.value.message
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" in message and "\n" not in message
    refuse_unsafe_environment({"VLLM_ALLOW_INSECURE_SERIALIZATION": "0"})  # off is fine
    with pytest.raises(ConfigError, match="engine environment"):
        refuse_unsafe_environment(
            {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, where="model 'x''s engine environment"
        )


def test_vllm_is_told_where_its_sockets_go_and_to_follow_no_redirects(tmp_path: Path) -> None:
    environ = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "1"}
    harden_environment(environ, tmp_path)
    assert environ == {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0", "VLLM_RPC_BASE_PATH": str(tmp_path)}
