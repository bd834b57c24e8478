"""Test helpers: a local OAuth provider and a way to serve it over real HTTP.

:class:`LocalProvider` is a pure ASGI app with a refresh-token endpoint (rotation, reuse detection,
fault injection), a protected API, and what an interactive client's login needs (authorization
endpoint with PKCE, dynamic client registration, metadata); :class:`ServerThread` and :func:`serve`
run it (or any ASGI app) under uvicorn on a free loopback port. Serving needs the extra:
``pip install httpx-upstream-auth[testing]``::

    from httpx_upstream_auth.testing import LocalProvider, serve

    provider = LocalProvider(access_ttl=60, rotate=True)
    tokens = provider.login(sub="alice")
    with serve(provider) as server:
        token_url = server.url + "/token"

The provider's registered clients (:attr:`LocalProvider.clients`, change them freely) are ``test-client``
with secret ``test-secret`` (``client_secret_basic``), ``post-client`` with ``post-secret``
(``client_secret_post``) and ``public-client`` (no secret, ``none``). From the command line,
``python -m httpx_upstream_auth.testing serve --write-to DIR`` serves it until Ctrl-C, prints its token URL
and these credentials, and writes a configuration for ``httpx-upstream-auth`` and a first login's token
answer to import (see docs/cli.md).

:func:`serve_mcp` starts a real MCP server (from the ``mcp`` package) whose tools need the provider's
live tokens (a :class:`LocalMCPServer`; its :class:`LocalTokenVerifier` counts them). They need ``mcp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._provider import LocalProvider, protected_resource_metadata
from ._server import ServerThread, serve

if TYPE_CHECKING:
    from ._mcp import LocalMCPServer, LocalTokenVerifier, serve_mcp

__all__ = [
    "LocalMCPServer",
    "LocalProvider",
    "LocalTokenVerifier",
    "ServerThread",
    "protected_resource_metadata",
    "serve",
    "serve_mcp",
]


def __getattr__(name: str) -> Any:
    # The MCP helpers import ``mcp`` only when used, so the rest works without it.
    if name in ("LocalMCPServer", "LocalTokenVerifier", "serve_mcp"):
        from . import _mcp

        return getattr(_mcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
