"""Which policies a replica enforces, in /metrics and in the reload log: ``guardproxy_policy_info{role,name,version,
digest}``, ``guardproxy_policy_reload_failures_total``, and a warning for a policy whose rules changed under an
unchanged name@version."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_guard import ADMIN, POLICIES, Gateway, gateway

ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
VERSION = "2026.12.07.1"


async def _samples(gw: Gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = (await gw.client.get(f"{gw.url}/metrics")).text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def _info(gw: Gateway) -> set[tuple[str, str, str, str]]:
    """(role, name, version, digest) of every guardproxy_policy_info series; each must be 1."""
    samples = await _samples(gw, "guardproxy_policy_info")
    assert set(samples.values()) <= {1.0}, samples
    out = set()
    for labels in samples:
        d = dict(labels)
        assert re.fullmatch(r"[0-9a-f]{8}", d["digest"]), d
        out.add((d["role"], d["name"], d["version"], d["digest"]))
    return out


async def _failures(gw: Gateway) -> float | None:
    return (await _samples(gw, "guardproxy_policy_reload_failures_total")).get(())


def _digest_of(info: set[tuple[str, str, str, str]], role: str, name: str) -> str:
    (digest,) = [d for r, n, _, d in info if (r, n) == (role, name)]
    return digest


async def test_metrics_name_the_policies_in_force_and_count_rejected_reloads(tmp_path: Path) -> None:
    active, shadow = tmp_path / "active.toml", tmp_path / "shadow.toml"
    shutil.copy(POLICIES / "default.toml", active)
    shutil.copy(POLICIES / "strict.toml", shadow)
    async with gateway(tmp_path, active, [shadow]) as gw:
        before = await _info(gw)
        assert {(r, n, v) for r, n, v, _ in before} == {("active", "default", VERSION), ("shadow", "strict", VERSION)}
        assert _digest_of(before, "active", "default") != _digest_of(before, "shadow", "strict")
        assert await _failures(gw) == 0.0  # at 0 from the start: absent() and increase() alerts work

        # a new version of the shadow: its old series goes, the new one comes, the active one stays as it was
        shadow.write_text(
            shadow.read_text()
            .replace(f'version = "{VERSION}"', 'version = "walk.4"')
            .replace("harm_threshold = 0.5", "harm_threshold = 0.6")
        )
        r = await gw.client.post(f"{gw.url}/guard/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        after = await _info(gw)
        assert {(r, n, v) for r, n, v, _ in after} == {("active", "default", VERSION), ("shadow", "strict", "walk.4")}
        assert _digest_of(after, "active", "default") == _digest_of(before, "active", "default")
        assert _digest_of(after, "shadow", "strict") != _digest_of(before, "shadow", "strict")

        # a rejected reload is counted, and the policies in force (and their series) stay
        shadow.write_text("this is not TOML [")
        r = await gw.client.post(f"{gw.url}/guard/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 422
        assert await _failures(gw) == 1.0
        assert await _info(gw) == after
        assert (await gw.bundle.areload()) is not None  # the SIGHUP path counts too
        assert await _failures(gw) == 2.0


async def test_a_mapping_exports_every_policy_it_loads_with_each_role(tmp_path: Path) -> None:
    for name in ("default", "strict", "monitor"):
        shutil.copy(POLICIES / f"{name}.toml", tmp_path / f"{name}.toml")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        "schema_version = 1\n"
        '[default]\nactive = "default.toml"\nshadows = ["monitor.toml"]\n'
        '[[routes]]\ntenant = "kids-app"\nactive = "strict.toml"\nshadows = ["default.toml"]\n'
    )
    async with gateway(tmp_path, tmp_path / "default.toml", mapping=mapping) as gw:
        info = await _info(gw)
    assert {(r, n, v) for r, n, v, _ in info} == {
        ("active", "default", VERSION),
        ("active", "strict", VERSION),
        ("shadow", "monitor", VERSION),
        ("shadow", "default", VERSION),  # default is a shadow for kids-app: one series per role
    }
    assert _digest_of(info, "active", "default") == _digest_of(info, "shadow", "default")


async def test_a_rule_change_without_a_version_bump_reloads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guardproxy.guard")
    active = tmp_path / "active.toml"
    shutil.copy(POLICIES / "default.toml", active)
    async with gateway(tmp_path, active) as gw:
        (before,) = await _info(gw)

        # a comment-only edit: same rules, so no warning and the same digest
        active.write_text("# fixed a typo in a comment\n" + active.read_text())
        caplog.clear()
        r = await gw.client.post(f"{gw.url}/guard/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 200
        assert [rec.levelname for rec in caplog.records] == ["INFO"], caplog.text
        assert caplog.records[0].getMessage() == f"policies reloaded: default@{VERSION} ({before[3]})"
        assert await _info(gw) == {before}

        # the rules change, the version does not: reloaded (not refused), with a warning naming the file
        active.write_text(active.read_text().replace("harm_threshold = 0.5", "harm_threshold = 0.6"))
        caplog.clear()
        r = await gw.client.post(f"{gw.url}/guard/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 200 and r.json()["policies"] == [f"default@{VERSION}"]
        (after,) = await _info(gw)
        assert after[:3] == before[:3] and after[3] != before[3]
        warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        assert str(active) in warnings[0] and f"default@{VERSION}" in warnings[0]
        assert "version was not bumped" in warnings[0] and "policy compare" in warnings[0]
        assert f"{before[3]} -> {after[3]}" in warnings[0]
        infos = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO]
        assert f"policies reloaded: default@{VERSION} ({after[3]})" in infos

        # the same change with a bumped version: no warning
        active.write_text(
            active.read_text()
            .replace("harm_threshold = 0.6", "harm_threshold = 0.55")
            .replace(f'version = "{VERSION}"', 'version = "walk.5"')
        )
        caplog.clear()
        r = await gw.client.post(f"{gw.url}/guard/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 200
        assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text


async def test_the_watcher_warns_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="guardproxy.guard")
    active = tmp_path / "active.toml"
    shutil.copy(POLICIES / "default.toml", active)
    async with gateway(tmp_path, active, watch=True) as gw:
        (before,) = await _info(gw)
        active.write_text(active.read_text().replace("harm_threshold = 0.5", "harm_threshold = 0.9"))
        for _ in range(50):
            if "version was not bumped" in caplog.text:
                break
            await asyncio.sleep(0.1)
        assert "version was not bumped" in caplog.text
        (after,) = await _info(gw)
        assert after[3] != before[3]
