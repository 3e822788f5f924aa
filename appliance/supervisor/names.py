"""Names in the model table: a requested name, alias or LoRA adapter -> the entry serving it.

``NameIndex`` answers every name question over the supervisor's table (``target_of``,
``resolve``, ``model_named``, ``names_of``, ``adapter_names``). Entry names are read live from
the table; the alias and adapter indexes are rebuilt from the handles whenever the table or an
entry's names change, and each rebuild tells the lending board, so HTTP workers drop what they
cached about names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from appliance.errors import ModelNotFoundError
from appliance.supervisor.handle import ModelHandle
from appliance.supervisor.lending_board import LendingBoard

log = logging.getLogger("appliance.supervisor")


@dataclass(frozen=True)
class Target:
    """Where a requested name goes (plain data: it may cross a process boundary later)."""

    entry: str  # the catalogue entry whose engine serves it
    served_as: str  # the model name the engine is asked for (an adapter keeps its own)
    names: tuple[str, ...]  # the names a key may list to be allowed it


class NameIndex:
    """Name, alias and adapter -> entry, over the table ``models`` (read live, never copied)."""

    def __init__(self, models: Mapping[str, ModelHandle]) -> None:
        self._models = models
        self._aliases: dict[str, str] = {}  # alias -> the name of the entry it stands for
        self._adapters: dict[str, str] = {}  # LoRA adapter -> the model whose engine has it

    def rebuild(self, board: LendingBoard) -> None:
        """Rebuild alias -> name and adapter -> model from the handles, and tell ``board`` the
        table changed; a name, then an earlier alias or adapter, wins a clash (registry input;
        models.yaml refuses clashes at start)."""
        aliases: dict[str, str] = {}
        adapters: dict[str, str] = {}
        for kind, names, index in (
            ("alias", lambda h: h.spec.aliases, aliases),
            ("adapter", lambda h: list(h.adapters), adapters),
        ):
            for handle in self._models.values():
                for extra in names(handle):
                    if extra in self._models or extra in aliases or extra in adapters:
                        log.error(
                            "model %s: %s %r is taken by another entry; ignored",
                            handle.name,
                            kind,
                            extra,
                            extra={"model": handle.name, "event": "name_clash"},
                        )
                        continue
                    index[extra] = handle.name
        self._aliases = aliases
        self._adapters = adapters
        board.table_changed()

    def target_of(self, name: str) -> Target | None:
        """What a request naming ``name`` gets: the entry whose engine serves it, the name
        that engine is asked for, and every name a key may list to use it; None if unknown."""
        if name in self._models:
            return Target(name, name, tuple(self.names_of(name)))
        if name in self._aliases:
            entry = self._aliases[name]
            return Target(entry, entry, tuple(self.names_of(name)))
        if name in self._adapters:
            # An adapter is a model of its own to clients: vLLM answers under its name.
            return Target(self._adapters[name], name, (name,))
        return None

    def resolve(self, name: str) -> str:
        """The entry serving ``name`` (a name, alias or adapter); 404 if there is none."""
        target = self.target_of(name)
        if target is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist in this appliance's catalogue", param="model"
            )
        return target.entry

    def model_named(self, name: str) -> str:
        """The entry named ``name`` or aliased so (an adapter is not a model to operate on);
        404 if there is none."""
        if name in self._models:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ModelNotFoundError(
            f"The model {name!r} does not exist in this appliance's catalogue", param="model"
        )

    def names_of(self, name: str) -> list[str]:
        """Every name of the entry ``name`` stands for, its own first; [] if there is none."""
        entry = name if name in self._models else self._aliases.get(name)
        if entry is None:
            return []
        return [entry, *self.aliases_of(entry)]

    def aliases_of(self, entry: str) -> list[str]:
        """The aliases of the entry named ``entry``, in index order."""
        return [a for a, e in self._aliases.items() if e == entry]

    def adapter_names(self) -> list[str]:
        """Every LoRA adapter name in the table."""
        return list(self._adapters)

    def adapter_model(self, name: str) -> str | None:
        """The model whose engine serves adapter ``name``; None if no adapter is so named."""
        return self._adapters.get(name)
