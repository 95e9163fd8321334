"""Which policies are in force: the active one and the shadows, per tenant or model, swapped whole on reload.

``PolicySet`` loads ``settings.policy.active`` and ``settings.policy.shadows`` (a relative path from the current
directory, else from the project root: ``policy.resolve_policy_path``), or a mapping file
(``settings.policy.mapping``) whose routes pick them per tenant or per request model. ``reload`` builds a
complete new set and swaps it in one assignment; a file that fails validation leaves the old set in force.
``check_mapping_file`` lists every problem of a mapping file and of the policy files it names, as ``policy check
--mapping`` prints them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from guardproxy.errors import PolicyError
from guardproxy.policy import (
    Policy,
    field_path,
    read_toml,
    resolve_policy_path,
    try_load_policy,
    validation_issues,
)
from guardproxy.settings import DEFAULT_POLICY
from guardproxy.tomllines import KeyLines

log = logging.getLogger(__name__)


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
    # where a mapping file names each policy path it names ("mapping.toml:4: default.shadows[1]"), for the error about
    # a file that cannot be read: the line to fix is the mapping's
    named_at: Mapping[Path, str] = field(default_factory=dict)

    def select(self, tenant: str, model: str | None) -> tuple[Path, tuple[Path, ...]]:
        for route in self.routes:
            if route.matches(tenant, model):
                return route.active, route.shadows
        return self.default_active, self.default_shadows

    def paths(self) -> tuple[Path, ...]:
        """Every policy path, each once: the active ones first (the default's, then the routes'), then the shadows.
        Of two files with one name@version, the later one is the copy that ``load_policies`` reports."""
        actives = [self.default_active, *(r.active for r in self.routes)]
        shadows = [*self.default_shadows, *(s for r in self.routes for s in r.shadows)]
        return tuple(dict.fromkeys([*actives, *shadows]))


def load_mapping(path: str | Path, *, active: Path, shadows: Sequence[Path]) -> PolicyMapping:
    """Load a mapping file; policy paths in it are relative to the mapping file. ``active`` and ``shadows`` stand in
    where its ``[default]`` names none (``settings.policy``). Raises ``PolicyError``."""
    path = Path(path)
    data, text, issues = read_toml(path)
    if data is None:
        raise PolicyError([str(i) for i in issues], where=str(path))
    lines = KeyLines(text)
    try:
        mf = MappingFile.model_validate(data)
    except ValidationError as exc:
        issues = validation_issues(str(path), lines, exc)
        raise PolicyError([str(i) for i in issues], where=str(path)) from exc
    base = path.resolve().parent
    named: dict[Path, str] = {}

    def rel(p: str, *loc: str | int) -> Path:
        out = (base / p).resolve()
        named.setdefault(out, f"{path}:{lines.line_of(loc)}: {field_path(loc)}")
        return out

    default = mf.default
    return PolicyMapping(
        default_active=rel(default.active, "default", "active") if default.active else active.resolve(),
        default_shadows=(
            tuple(rel(p, "default", "shadows", i) for i, p in enumerate(default.shadows))
            if default.shadows is not None
            else tuple(p.resolve() for p in shadows)
        ),
        routes=tuple(
            MappingRule(
                r.tenant,
                r.model,
                rel(r.active, "routes", n, "active"),
                tuple(rel(s, "routes", n, "shadows", i) for i, s in enumerate(r.shadows)),
            )
            for n, r in enumerate(mf.routes)
        ),
        named_at=named,
    )


def load_policies(
    paths: Iterable[Path], *, named_at: Mapping[Path, str] | None = None
) -> tuple[dict[Path, Policy], list[str]]:
    """Load every policy file in ``paths``: the policies that loaded, and every problem, one line each with file and
    line. A file that cannot be read is reported where ``named_at`` (a mapping's) names it. Of two files with one
    name@version, the later in ``paths`` is reported at its ``name``: list the active ones first, so that the copy
    is the file named."""
    named_at = named_at or {}
    policies: dict[Path, Policy] = {}
    problems: list[str] = []
    for path in paths:
        policy, issues = try_load_policy(path)
        if policy is not None:
            policies[path] = policy
        where = named_at.get(path)
        problems += [f"{where}: {issue}" if where and issue.line <= 0 else str(issue) for issue in issues]
    first: dict[str, Path] = {}
    for path, policy in policies.items():
        if (original := first.setdefault(policy.ref, path)) != path:
            problems.append(
                f"{path}:{policy.line_of(('name',))}: name: {policy.ref} is also the name@version of {original}: "
                "give this file a name or version of its own"
            )
    return policies, problems


def check_mapping_file(path: str | Path) -> list[str]:
    """Every problem in a mapping file and in each policy file it names (a missing one too), one line each with file
    and line: what ``PolicySet`` would refuse to start on. A policy the mapping leaves to ``settings.policy`` (no
    ``[default] active``) is not checked here: check it by name."""
    try:
        mapping = load_mapping(path, active=DEFAULT_POLICY, shadows=())
    except PolicyError as exc:
        return list(exc.issues)
    named = [p for p in mapping.paths() if p in mapping.named_at]
    return load_policies(named, named_at=mapping.named_at)[1]


# --- the loaded set: active and shadow policies, swapped whole on reload ------------------------------


def policy_digest(policy: Policy) -> str:
    """The sha256 (hex) of a policy's parsed content: every field, defaults filled in, keys sorted. A comment, a
    blank line or the order of keys in the file leaves it as it was; any change to what the policy decides or
    writes (a line, a rule, a refusal text) changes it. Equal on every replica that enforces the same rules."""
    canonical = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def short_digest(digest: str) -> str:
    """What logs and ``guardproxy_policy_info{digest}`` show: the first 8 hex digits."""
    return digest[:8]


@dataclass(frozen=True)
class Unbumped:
    """A policy reloaded under the name@version it had, with other content: its version was not bumped."""

    path: Path
    ref: str  # name@version
    old: str  # short digests
    new: str


@dataclass(frozen=True)
class LoadedPolicy:
    """One loaded policy in one role (``active`` or ``shadow``): a file active for one tenant and a shadow for
    another is listed in both."""

    role: Literal["active", "shadow"]
    name: str
    version: str
    digest: str  # short


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    error: str | None
    policies: tuple[str, ...]  # name@version of every loaded policy (the old ones when ok is False)
    digests: Mapping[str, str] = field(default_factory=dict)  # name@version -> short digest, of ``policies``
    unbumped: tuple[Unbumped, ...] = ()  # policies whose content changed under an unchanged name@version

    def described(self) -> tuple[str, ...]:
        """``name@version (digest)`` of every loaded policy."""
        return tuple(f"{ref} ({self.digests[ref]})" if ref in self.digests else ref for ref in self.policies)


@dataclass(frozen=True)
class _Loaded:
    mapping: PolicyMapping
    policies: Mapping[Path, Policy]
    mtimes: Mapping[Path, float]
    digests: Mapping[Path, str] = field(default_factory=dict)  # full sha256 hex, per policy file

    def by_ref(self) -> dict[str, tuple[Path, str]]:
        return {p.ref: (path, self.digests[path]) for path, p in self.policies.items()}


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
        log.info("policies in force: %s", self.describe())

    def _load(self) -> _Loaded:
        if self._mapping is not None:
            mapping = load_mapping(self._mapping, active=self._active, shadows=self._shadows)
        else:
            mapping = PolicyMapping(self._active.resolve(), tuple(p.resolve() for p in self._shadows))
        policies, problems = load_policies(mapping.paths(), named_at=mapping.named_at)
        if problems:
            raise PolicyError(problems)
        watched = set(policies) | ({self._mapping.resolve()} if self._mapping else set())
        digests = {path: policy_digest(p) for path, p in policies.items()}
        return _Loaded(mapping, policies, {p: _mtime(p) for p in watched}, digests)

    def reload(self) -> ReloadResult:
        """Load every file again and swap the new set in whole; on a file that fails validation, keep the old set
        and return the error. ``unbumped`` lists each policy whose content changed while its name@version did not
        (reloaded all the same: an edit to a refusal text or a typo fix should not need a version to take effect)."""
        try:
            loaded = self._load()
        except PolicyError as exc:
            return ReloadResult(False, "; ".join(exc.issues), self.refs(), self.digests())
        before = self._loaded.by_ref()
        unbumped = tuple(
            Unbumped(path, ref, short_digest(before[ref][1]), short_digest(digest))
            for ref, (path, digest) in sorted(loaded.by_ref().items())
            if ref in before and before[ref][1] != digest
        )
        self._loaded = loaded
        return ReloadResult(True, None, self.refs(), self.digests(), unbumped)

    def changed(self) -> bool:
        """Whether any loaded file's modification time differs from when it was loaded."""
        return any(_mtime(p) != m for p, m in self._loaded.mtimes.items())

    def fingerprint(self) -> tuple[tuple[Path, float], ...]:
        """The current modification times of the loaded files: a watcher reloads when this changes, once."""
        return tuple((p, _mtime(p)) for p in sorted(self._loaded.mtimes))

    def describe(self) -> str:
        """Which policy is active and which are shadows, in one line: ``active default@1, shadows monitor@2``, then
        each mapping route's (``; tenant kids-app: active strict@3, no shadows``)."""
        loaded = self._loaded
        mapping = loaded.mapping

        def roles(active: Path, shadows: Sequence[Path]) -> str:
            names = ", ".join(loaded.policies[s].ref for s in shadows if s != active)
            return f"active {loaded.policies[active].ref}, " + (f"shadows {names}" if names else "no shadows")

        out = [roles(mapping.default_active, mapping.default_shadows)]
        for r in mapping.routes:
            who = " ".join(f"{k} {v}" for k, v in (("tenant", r.tenant), ("model", r.model)) if v is not None)
            out.append(f"{who or 'every request'}: {roles(r.active, r.shadows)}")
        return "; ".join(out)

    def refs(self) -> tuple[str, ...]:
        return tuple(sorted(p.ref for p in self._loaded.policies.values()))

    def digests(self) -> dict[str, str]:
        """name@version -> short digest (``policy_digest``) of every loaded policy."""
        return {ref: short_digest(digest) for ref, (_, digest) in self._loaded.by_ref().items()}

    def in_force(self) -> tuple[LoadedPolicy, ...]:
        """Every loaded policy with each role it has: active for the default or a mapping route, shadow for one."""
        loaded = self._loaded
        mapping = loaded.mapping
        out: dict[LoadedPolicy, None] = {}
        for active, shadows in [(mapping.default_active, mapping.default_shadows),
                                *((r.active, r.shadows) for r in mapping.routes)]:  # fmt: skip
            roles: list[tuple[Literal["active", "shadow"], Path]] = [("active", active)]
            roles += [("shadow", s) for s in shadows if s != active]
            for role, path in roles:
                p = loaded.policies[path]
                out[LoadedPolicy(role, p.name, p.version, short_digest(loaded.digests[path]))] = None
        return tuple(out)

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
