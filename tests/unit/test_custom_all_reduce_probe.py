"""The doctor's custom all-reduce probe against the installed vLLM: it builds vLLM's own
``CustomAllreduce`` on a gloo group as a TP worker does. On this CPU build vLLM has no custom
all-reduce library, so the probe must report it off (and cost nothing), not fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import os, socket, torch.distributed as dist
from appliance.engines.vllm.collectives import custom_all_reduce_cost
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
print(custom_all_reduce_cost(0, lambda: (0, 0)))
dist.destroy_process_group()
"""


def test_the_probe_builds_vllms_custom_all_reduce_and_reports_it_off_on_cpu() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "'custom_ar': 0" in last and "'custom_ar_state': 'off: vLLM disables it" in last
