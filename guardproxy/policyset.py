"""Which policies are in force: the active one and the shadows, per tenant or model, swapped whole on reload.

``PolicySet`` loads ``settings.policy.active`` and ``settings.policy.shadows`` (a relative path from the current
directory, else from the project root: ``policy.resolve_policy_path``), or a mapping file
(``settings.policy.mapping``) whose routes pick them per tenant or per request model. ``reload`` builds a
complete new set and swaps it in one assignment; a file that fails validation leaves the old set in force.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from guardproxy.errors import PolicyError
from guardproxy.policy import Policy, load_policy, read_toml, resolve_policy_path, validation_issues
from guardproxy.tomllines import KeyLines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _MappingEntry(_Strict):
    tenant: str | None = None
    model: str | None = None  # fnmatch pattern over the request's "model"
    active: str
    shadows: tuple[str, ...] = ()


class _MappingDefault(_Strict):
    active: str | None = None  # None: settings.policy.active
    shadows: tuple[str, ...] | None = None  # None: settings.policy.shadows


class MappingFile(_Strict):
    schema_version: Literal[1]
    default: _MappingDefault = _MappingDefault()
    routes: tuple[_MappingEntry, ...] = ()


@dataclass(frozen=True)
class MappingRule:
    """Which policies apply to one exchange: the first mapping route whose tenant and model both match."""

    tenant: str | None
    model: str | None
    active: Path
    shadows: tuple[Path, ...]

    def matches(self, tenant: str, model: str | None) -> bool:
        from fnmatch import fnmatchcase

        if self.tenant is not None and self.tenant != tenant:
            return False
        return self.model is None or (model is not None and fnmatchcase(model, self.model))


@dataclass(frozen=True)
class PolicyMapping:
    default_active: Path
    default_shadows: tuple[Path, ...]
    routes: tuple[MappingRule, ...] = field(default=())

    def select(self, tenant: str, model: str | None) -> tuple[Path, tuple[Path, ...]]:
        for route in self.routes:
            if route.matches(tenant, model):
                return route.active, route.shadows
        return self.default_active, self.default_shadows

    def paths(self) -> set[Path]:
        out = {self.default_active, *self.default_shadows}
        for r in self.routes:
            out.update((r.active, *r.shadows))
        return out


def load_mapping(path: str | Path, *, active: Path, shadows: Sequence[Path]) -> PolicyMapping:
    """Load a mapping file; policy paths in it are relative to the mapping file. Raises ``PolicyError``."""
    path = Path(path)
    data, text, issues = read_toml(path)
    if data is None:
        raise PolicyError([str(i) for i in issues], where=str(path))
    try:
        mf = MappingFile.model_validate(data)
    except ValidationError as exc:
        issues = validation_issues(str(path), KeyLines(text), exc)
        raise PolicyError([str(i) for i in issues], where=str(path)) from exc
    base = path.resolve().parent

    def rel(p: str) -> Path:
        return (base / p).resolve()

    return PolicyMapping(
        default_active=rel(mf.default.active) if mf.default.active else active.resolve(),
        default_shadows=(
            tuple(rel(p) for p in mf.default.shadows)
            if mf.default.shadows is not None
            else tuple(p.resolve() for p in shadows)
        ),
        routes=tuple(
            MappingRule(r.tenant, r.model, rel(r.active), tuple(rel(s) for s in r.shadows)) for r in mf.routes
        ),
    )


# --- the loaded set: active and shadow policies, swapped whole on reload ------------------------------


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    error: str | None
    policies: tuple[str, ...]  # name@version of every loaded policy (the old ones when ok is False)


@dataclass(frozen=True)
class _Loaded:
    mapping: PolicyMapping
    policies: Mapping[Path, Policy]
    mtimes: Mapping[Path, float]


class PolicySet:
    """The policies in force: the active one and the shadows per tenant or model (``settings.policy``).

    ``reload`` builds a complete new set and swaps it in one assignment, so a request sees either the
    old set or the new one; if any file fails validation nothing changes and the error is returned.
    """

    def __init__(self, active: Path, shadows: Sequence[Path] = (), *, mapping: Path | None = None) -> None:
        # found as the CLI's --policy is: from the current directory, else from the project root (the default's)
        self._active = resolve_policy_path(active)
        self._shadows = tuple(resolve_policy_path(p) for p in shadows)
        self._mapping = Path(mapping) if mapping is not None else None
        self._loaded = self._load()  # raises PolicyError: a gateway does not start on a broken policy

    def _load(self) -> _Loaded:
        if self._mapping is not None:
            mapping = load_mapping(self._mapping, active=self._active, shadows=self._shadows)
        else:
            mapping = PolicyMapping(self._active.resolve(), tuple(p.resolve() for p in self._shadows))
        policies: dict[Path, Policy] = {}
        problems: list[str] = []
        for path in sorted(mapping.paths()):
            try:
                policies[path] = load_policy(path)
            except PolicyError as exc:
                problems.extend(exc.issues)
        refs: dict[str, Path] = {}
        for path, policy in policies.items():
            if policy.ref in refs:
                problems.append(f"{path}:1: name: {policy.ref} is also the name@version of {refs[policy.ref]}")
            refs.setdefault(policy.ref, path)
        if problems:
            raise PolicyError(problems)
        watched = set(policies) | ({self._mapping.resolve()} if self._mapping else set())
        return _Loaded(mapping, policies, {p: _mtime(p) for p in watched})

    def reload(self) -> ReloadResult:
        try:
            loaded = self._load()
        except PolicyError as exc:
            return ReloadResult(False, "; ".join(exc.issues), self.refs())
        self._loaded = loaded
        return ReloadResult(True, None, self.refs())

    def changed(self) -> bool:
        """Whether any loaded file's modification time differs from when it was loaded."""
        return any(_mtime(p) != m for p, m in self._loaded.mtimes.items())

    def fingerprint(self) -> tuple[tuple[Path, float], ...]:
        """The current modification times of the loaded files: a watcher reloads when this changes, once."""
        return tuple((p, _mtime(p)) for p in sorted(self._loaded.mtimes))

    def refs(self) -> tuple[str, ...]:
        return tuple(sorted(p.ref for p in self._loaded.policies.values()))

    def select(self, tenant: str, model: str | None) -> tuple[Policy, tuple[Policy, ...]]:
        loaded = self._loaded  # one read: a concurrent reload cannot mix old and new
        active, shadows = loaded.mapping.select(tenant, model)
        return loaded.policies[active], tuple(loaded.policies[s] for s in shadows if s != active)

    def all(self) -> tuple[Policy, ...]:
        """Every loaded policy: active ones and shadows, of every tenant and model the mapping names."""
        return tuple(self._loaded.policies.values())

    @property
    def default(self) -> Policy:
        loaded = self._loaded
        return loaded.policies[loaded.mapping.default_active]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
