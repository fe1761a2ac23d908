"""Entry-point registries: one per group, filled from installed distributions' metadata.

cnnkit's own architectures, datasets and trainers are declared in its ``pyproject.toml`` under the
same groups a plugin uses, so there is one path for both. Listing reads ``entry_points.txt`` files
only; an entry's code is imported the first time it is used. A plugin that fails to import is
reported in one line and skipped; two distributions claiming one name are reported and resolved
in favour of cnnkit itself (``dist:name`` picks the other one explicitly).

Switches (like pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``):

- ``CNNKIT_DISABLE_PLUGIN_AUTOLOAD=1``: use cnnkit's built-ins only,
- ``CNNKIT_PLUGINS=dist-a,dist-b``: with autoload disabled, still load these distributions.

An entry that names a class (as trainers do) is instantiated afresh on every :meth:`Registry.get`,
so nothing one run attaches to a trainer leaks into the next; an entry that names an object (a
model or dataset spec) is shared, since specs are immutable descriptions.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import entrypoints

from cnnkit._console import warn
from cnnkit.errors import PluginLoadError, UnknownNameError, UsageError
from cnnkit.protocols import DatasetSpec, ModelSpec, Trainer

__all__ = ["Entry", "Registry", "normalise_distribution", "MODELS", "DATASETS", "TRAINERS", "BUILTIN_DISTRIBUTION"]

BUILTIN_DISTRIBUTION = "cnnkit"
T = TypeVar("T")


def normalise_distribution(dist: str) -> str:
    """The canonical spelling of a distribution name (``cnnkit_efficientnet`` -> ``cnnkit-efficientnet``)."""
    return dist.lower().replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class Entry:
    """One registered name, as the metadata declares it (nothing imported)."""

    name: str
    target: str
    """``module:object`` the name points to."""
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return normalise_distribution(self.distribution) == BUILTIN_DISTRIBUTION


def _installed_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return ""


def _autoload_allowed(distribution: str) -> bool:
    if normalise_distribution(distribution) == BUILTIN_DISTRIBUTION:
        return True
    if os.environ.get("CNNKIT_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in {"", "0", "false"}:
        allowed = {normalise_distribution(d) for d in os.environ.get("CNNKIT_PLUGINS", "").split(",") if d.strip()}
        return normalise_distribution(distribution) in allowed
    return True


class Registry(Generic[T]):
    """The names registered under one entry-point group, loaded lazily and checked against a protocol."""

    def __init__(self, group: str, kind: str, protocol: type) -> None:
        self.group = group
        self.kind = kind
        self.protocol = protocol
        self._entries: dict[str, Entry] | None = None
        self._shadowed: dict[str, Entry] = {}
        self._disabled: dict[str, Entry] = {}
        self._loaded: dict[str, Any] = {}

    # -- metadata only ---------------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        """Name -> entry for every usable registration, sorted by name; imports no plugin code."""
        if self._entries is None:
            self._entries, self._shadowed = self._scan()
        return self._entries

    def shadowed(self) -> dict[str, Entry]:
        """``dist:name`` -> entry for every registration that lost a name clash."""
        self.entries()
        return dict(self._shadowed)

    def disabled(self) -> dict[str, Entry]:
        """Name -> entry for every registration the autoload switches turned off."""
        self.entries()
        return dict(self._disabled)

    def _scan(self) -> tuple[dict[str, Entry], dict[str, Entry]]:
        by_name: dict[str, list[Entry]] = {}
        seen: set[tuple[str, str]] = set()
        self._disabled = {}
        for ep in entrypoints.get_group_all(self.group):
            # Folder names spell distributions with underscores; show the canonical dashed name.
            dist = normalise_distribution(ep.distro.name) if ep.distro is not None else "unknown"
            version = (ep.distro.version or "") if ep.distro is not None else ""
            if not version and dist != "unknown":
                # A source checkout's versionless *.egg-info can shadow the installed metadata.
                version = _installed_version(dist)
            # The same distribution can sit on sys.path twice (e.g. a build dir); first one wins.
            if (ep.name, normalise_distribution(dist)) in seen:
                continue
            seen.add((ep.name, normalise_distribution(dist)))
            target = ep.module_name + (f":{ep.object_name}" if ep.object_name else "")
            if not _autoload_allowed(dist):
                self._disabled.setdefault(ep.name, Entry(ep.name, target, dist, version))
                continue
            by_name.setdefault(ep.name, []).append(Entry(ep.name, target, dist, version))

        chosen: dict[str, Entry] = {}
        shadowed: dict[str, Entry] = {}
        for name, claims in by_name.items():
            claims.sort(key=lambda e: (not e.builtin, normalise_distribution(e.distribution)))
            chosen[name] = claims[0]
            for other in claims[1:]:
                shadowed[f"{normalise_distribution(other.distribution)}:{name}"] = other
                warn(
                    f"{self.kind} '{name}' is registered by both '{claims[0].distribution}' and "
                    f"'{other.distribution}'; using '{claims[0].distribution}' "
                    f"(ask for '{normalise_distribution(other.distribution)}:{name}' to use the other)"
                )
        return dict(sorted(chosen.items())), shadowed

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, optionally filtered by an fnmatch pattern such as ``'res*'``."""
        names = list(self.entries())
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
        return names

    def entry(self, name: str) -> Entry:
        """The entry for ``name`` (or ``dist:name``); ``UnknownNameError`` lists what exists."""
        entries = self.entries()
        if name in entries:
            return entries[name]
        if ":" in name:
            dist, _, short = name.partition(":")
            qualified = f"{normalise_distribution(dist)}:{short}"
            if qualified in self._shadowed:
                return self._shadowed[qualified]
            if short in entries and normalise_distribution(entries[short].distribution) == normalise_distribution(dist):
                return entries[short]
        off = self._disabled.get(name.partition(":")[2] if ":" in name else name)
        if off is not None:
            raise UsageError(
                f"{self.kind} '{name}' is provided by '{off.distribution}', which is installed but disabled "
                f"(CNNKIT_DISABLE_PLUGIN_AUTOLOAD is set); allow it with CNNKIT_PLUGINS={off.distribution}"
            )
        raise UnknownNameError(self.kind, name, entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries()

    # -- loading ---------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The object registered as ``name``, importing its module on first use; a class entry gives
        a fresh instance on every call."""
        entry = self.entry(name)
        key = f"{normalise_distribution(entry.distribution)}:{entry.name}"
        if key not in self._loaded:
            self._loaded[key] = self._import(entry)
        return self._instance(entry, self._loaded[key])

    def unchecked(self, name: str) -> Any:
        """The object ``name``'s module defines (an instance for a class entry), without the protocol
        check: for contract checks that say why an entry does not fit."""
        obj = self._import_raw(self.entry(name))
        return obj() if isinstance(obj, type) else obj

    def _import(self, entry: Entry) -> Any:
        obj = self._import_raw(entry)
        self._instance(entry, obj)  # fail here, at import, if it does not fit the protocol
        return obj

    def _import_raw(self, entry: Entry) -> Any:
        module_name, _, attr = entry.target.partition(":")
        try:
            ep = entrypoints.EntryPoint(entry.name, module_name, attr or None)
            obj: Any = ep.load()
        except Exception as exc:  # a plugin's import can raise anything
            raise PluginLoadError(
                f"{self.kind} '{entry.name}' from '{entry.distribution}' failed to load "
                f"({type(exc).__name__}: {exc}); reinstall or remove that distribution"
            ) from exc
        return obj

    def _instance(self, entry: Entry, obj: Any) -> T:
        if isinstance(obj, type):
            try:
                obj = obj()
            except Exception as exc:  # a plugin's constructor can raise anything
                raise PluginLoadError(
                    f"{self.kind} '{entry.name}' from '{entry.distribution}' could not be created "
                    f"({type(exc).__name__}: {exc}); its class must take no arguments"
                ) from exc
        if not isinstance(obj, self.protocol):
            missing = [name for name in _protocol_members(self.protocol) if not hasattr(obj, name)]
            raise PluginLoadError(
                f"{self.kind} '{entry.name}' from '{entry.distribution}' ({entry.target}) is not a "
                f"{self.protocol.__name__} (it has no {', '.join(missing) or 'matching members'}); "
                "see docs/plugins.md"
            )
        return cast(T, obj)

    def load_all(self, pattern: str | None = None) -> dict[str, T]:
        """Every loadable entry; a broken plugin is reported in one line and left out."""
        loaded: dict[str, T] = {}
        for name in self.names(pattern):
            try:
                loaded[name] = self.get(name)
            except PluginLoadError as exc:
                warn(exc.format_message())
        return loaded

    def refresh(self) -> None:
        """Forget what was scanned and loaded (after installing a plugin, or in tests)."""
        self._entries = None
        self._shadowed = {}
        self._disabled = {}
        self._loaded.clear()


def _protocol_members(protocol: type) -> list[str]:
    """The members a runtime-checkable protocol's isinstance looks for."""
    members = getattr(protocol, "__protocol_attrs__", None)
    if members is None:  # before Python 3.12
        import typing

        members = typing._get_protocol_attrs(protocol)  # type: ignore[attr-defined]
    return sorted(members)


MODELS: Registry[ModelSpec] = Registry("cnnkit.models", "model", ModelSpec)
DATASETS: Registry[DatasetSpec] = Registry("cnnkit.datasets", "dataset", DatasetSpec)
TRAINERS: Registry[Trainer] = Registry("cnnkit.trainers", "trainer", Trainer)
