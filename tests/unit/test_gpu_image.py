"""Dockerfile.gpu's build-time FlashInfer check: the build has no GPU, and some flashinfer
versions crash at import without one, so the check reads the packages' metadata (the doctor's
own judgement) and never imports flashinfer."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile.gpu"


def test_the_image_build_judges_flashinfer_from_metadata_without_importing_it() -> None:
    commands = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = "\n".join(commands)
    assert "judge_flashinfer" in text and "installed_versions" in text
    assert not re.search(r"\b(import flashinfer|from flashinfer|flashinfer\.)", text)


def test_the_doctors_module_imports_neither_flashinfer_nor_vllm() -> None:
    """What the build step imports: appliance.doctor alone (its probes import CUDA libraries
    only inside spawned children)."""
    import subprocess
    import sys

    root = DOCKERFILE.parent
    probe = "import sys, appliance.doctor; print(sorted({'flashinfer', 'vllm'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert done.stdout.strip() == "[]"
