"""How the CLI shows pulls, downloads, files on disk and wake times."""

from __future__ import annotations

import io

from rich.console import Console

from appliance.cli.files_view import describe_files
from appliance.cli.load_progress import describe_state, describe_times
from appliance.cli.pull_cmd import PullView


def test_describe_state_while_downloading() -> None:
    model = {
        "state": "downloading",
        "download": {"done_bytes": 1_200_000_000, "total_bytes": 2_600_000_000, "seconds_left": 75},
    }
    assert describe_state(model) == "downloading 46% (1.2 GB of 2.6 GB, 75s left)"
    model["download"]["seconds_left"] = 600  # type: ignore[index]
    assert describe_state(model).endswith(", 10 min left)")
    assert describe_state({"state": "ready", "download": None}) == "ready"


def test_describe_state_while_converting_a_gguf_file() -> None:
    download = {"activity": "converting", "detail": "writing safetensors", "total_bytes": 9}
    model = {"state": "downloading", "download": download}
    assert describe_state(model) == "converting GGUF (writing safetensors)"


def test_describe_times_and_files() -> None:
    assert describe_times({"load_seconds": 31.23, "wake_seconds": 0.94}) == "31.2s (wake 0.9s)"
    assert describe_times({"load_seconds": None}) == "-"
    assert describe_files({"present": True, "size_bytes": 5_800_000}) == "yes, 5.8 MB"
    assert describe_files({"present": False, "size_bytes": 1000}) == "partial, 1.0 kB"
    assert describe_files({"present": False, "size_bytes": 0}) == "no"
    assert describe_files(None) == "-"


def test_pull_view_prints_lines_when_not_a_terminal() -> None:
    buffer = io.StringIO()
    with PullView(Console(file=buffer, width=200)) as view:
        view.show(
            {
                "event": "plan",
                "repo": "org/m",
                "total": 1100,
                "done": 100,
                "files": [
                    {"path": "config.json", "size": 100, "cached": True},
                    {"path": "model.safetensors", "size": 1000, "cached": False},
                ],
            }
        )
        view.show({"event": "progress", "file": "model.safetensors", "done": 500, "total": 1000})
        view.show({"event": "file_done", "file": "model.safetensors", "done": 1000})
        view.show({"event": "done", "repo": "org/m", "total": 1100, "folder": "/cache/x"})
    assert buffer.getvalue().splitlines() == [
        "pulling org/m: 2 files, 1.1 kB (1 already on disk)",
        "  model.safetensors  1.0 kB",
        "pulled org/m: 1.1 kB in /cache/x",
    ]
