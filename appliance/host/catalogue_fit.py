"""Does the whole catalogue fit this host? Each model, one line: ``appliance doctor --config``.

``HostCapacity.check_catalogue`` refuses at start the first problem only; an operator sizing a
catalogue for a new box wants every answer at once: which model cannot load even alone, which
autoload models do not fit together, and which on-demand models can load only once another
is evicted or asleep. Placement is the one ``appliance up`` uses (``placement.place``), on this
host's inventory and the catalogue's ``placement:`` policy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.catalogue.schema import ModelSpec, placed_here
from appliance.host.capacity import HostCapacity
from appliance.host.placement import Allocation, PlacementError


class Fit(str, enum.Enum):
    """How one model fits."""

    FITS = "fits"  # loads beside the autoload models as they are
    CROWDED = "crowded"  # fits alone, but not beside the autoload models
    NEVER = "never"  # does not fit even on an empty host


@dataclass(frozen=True)
class ModelFit:
    """One model's answer, with the devices it would get or why it gets none."""

    model: str
    fit: Fit
    detail: str


def fit_catalogue(specs: Iterable[ModelSpec], capacity: HostCapacity) -> list[ModelFit]:
    """Place every local model of ``specs`` on ``capacity``'s host, autoload models first (in
    catalogue order, as ``appliance up`` does), then each other model beside them."""
    local = [s for s in specs if placed_here(s)]
    kind = capacity.inventory.kind.value
    answers: dict[str, ModelFit] = {}
    for spec in local:
        try:
            capacity.place(spec, [])
        except PlacementError as exc:
            answers[spec.name] = ModelFit(spec.name, Fit.NEVER, f"{exc.message} (even alone)")
    placed: list[Allocation] = []
    ordered = [s for s in local if s.autoload] + [s for s in local if not s.autoload]
    for spec in ordered:
        if spec.name in answers:
            continue
        try:
            allocation = capacity.place(spec, placed)
        except PlacementError as exc:
            what = (
                "autoload, does not fit beside the other autoload models"
                if spec.autoload
                else ("loads only once an autoload model is evicted or asleep")
            )
            answers[spec.name] = ModelFit(spec.name, Fit.CROWDED, f"{what}: {exc.message}")
            continue
        if spec.autoload:
            placed.append(allocation)
        where = ", ".join(
            f"{kind}{d} {gib:.1f} GiB"
            for d, gib in zip(allocation.devices, allocation.reserved_gib, strict=True)
        )
        when = "autoload" if spec.autoload else "on demand, beside the autoload models"
        answers[spec.name] = ModelFit(spec.name, Fit.FITS, f"{when}: {where}")
    return [answers[s.name] for s in local]
