"""Fixtures shared by test files."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix on the machine's real Redis (127.0.0.1:6379) for this test alone; its keys are deleted
    afterwards (never the whole server: other tests and sessions share it)."""
    prefix = f"gptest:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.Redis(port=6379)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
