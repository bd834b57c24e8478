"""``httpx2.AsyncClient(auth=manager.auth(...))`` and the MCP helpers type-check under mypy --strict."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest.importorskip("httpx2", reason="httpx2 is not installed")
api = pytest.importorskip("mypy.api", reason="mypy is not installed")

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = """
import httpx
import httpx2
import httpx_upstream_auth as hua
from httpx_upstream_auth.mcp import AsyncMCPAuthTransport, connect, http_client

async def main(manager: hua.TokenManager) -> None:
    async with httpx2.AsyncClient(auth=manager.auth("s")) as client2:
        await client2.get("https://api.example/")
    with httpx2.Client(auth=manager.auth("s")) as sync2:
        sync2.get("https://api.example/")
    async with httpx.AsyncClient(auth=manager.auth("s")) as client1:
        await client1.get("https://api.example/")
    auth: httpx2.Auth = manager.auth("s")
    legacy: httpx.Auth = manager.auth("s")
    transport: httpx2.AsyncBaseTransport = AsyncMCPAuthTransport(manager, "s")
    async with http_client(manager, "s") as http:
        assert isinstance(http, httpx2.AsyncClient)
    async with connect("https://mcp.example/mcp", manager, "s", mode="legacy") as mcp_client:
        await mcp_client.call_tool("echo", {"text": "x"})
    print(auth, legacy, transport)
"""


def test_httpx2_clients_accept_upstream_auth_under_mypy_strict(tmp_path: Path) -> None:
    """mypy --strict accepts UpstreamAuth as auth= of httpx2 and httpx clients, and the MCP helpers' types."""
    source = tmp_path / "uses_httpx2.py"
    source.write_text(textwrap.dedent(SNIPPET))
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    assert status == 0, stdout + stderr
