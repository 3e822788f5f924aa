"""What the Batch API takes and how its runner works (one home for its defaults)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

BATCH_SCOPE = "appliance.batch"
"""Set (the batch's id) in the ASGI scope of the request the runner makes for one line; no
client can set a scope entry, so only the runner's requests carry it."""


class BatchSettings(BaseModel):
    """Caps on uploaded files and batches, and how many lines run at once."""

    model_config = ConfigDict(extra="forbid")

    max_file_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="Largest file POST /v1/files takes (the request body limit caps it too).",
    )
    max_lines: int = Field(10_000, ge=1, description="Most requests in one batch's input file.")
    max_files_per_key: int = Field(100, ge=1, description="Files a key may keep at once.")
    lines_at_once: int = Field(
        8,
        ge=1,
        description="Lines of one batch in flight at once (each at the lowest priority).",
    )
    max_window_hours: float = Field(
        168.0, gt=0, description="Longest completion_window a batch may ask for."
    )
