"""Test helpers: a local OAuth provider and a way to serve it over real HTTP.

:class:`LocalProvider` is a pure ASGI app with a refresh-token endpoint (rotation, reuse detection,
fault injection) and a protected API; :class:`ServerThread` and :func:`serve` run it (or any ASGI app)
under uvicorn on a free loopback port. Serving needs the extra: ``pip install httpx-upstream-auth[testing]``::

    from httpx_upstream_auth.testing import LocalProvider, serve

    provider = LocalProvider(access_ttl=60, rotate=True)
    tokens = provider.login(sub="alice")
    with serve(provider) as server:
        token_url = server.url + "/token"
"""

from __future__ import annotations

from ._provider import LocalProvider
from ._server import ServerThread, serve

__all__ = ["LocalProvider", "ServerThread", "serve"]
