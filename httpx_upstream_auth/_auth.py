"""``UpstreamAuth``: one object that is an ``httpx.Auth`` and, when httpx2 is installed, an ``httpx2.Auth``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import httpx

from ._async._auth import AsyncAuthFlow
from ._models import Binding
from ._sync._auth import SyncAuthFlow

if TYPE_CHECKING:
    import httpx2

    from ._coordinators import Coordinators

    # What type checkers see: both bases, so ``httpx2.AsyncClient(auth=manager.auth(...))`` type-checks
    # (mypy --strict, pyright). The two ``Auth`` classes name their own Request/Response types in the
    # flow signatures; ours are duck-typed over both, hence the ignore. Without httpx2 installed the
    # import resolves to ``Any`` and nothing changes for httpx users.
    class _AuthBase(httpx.Auth, httpx2.Auth):  # type: ignore[misc,unused-ignore]
        pass
else:
    try:
        import httpx2
    except ImportError:
        _AuthBase = httpx.Auth
    else:  # an httpx2 client rejects an auth that is not an httpx2.Auth

        class _AuthBase(httpx.Auth, httpx2.Auth):
            pass


__all__ = ["AuthSource", "UpstreamAuth"]


class UpstreamAuth(AsyncAuthFlow, SyncAuthFlow, _AuthBase):  # type: ignore[misc,unused-ignore]  # see _AuthBase
    """Authenticate requests as one session of one provider; pass it as ``auth=`` to a client.

    Made by :meth:`TokenManager.auth`, cheaply (no I/O, no locks): gateways make one per request.
    The same object serves ``httpx.Client``, ``httpx.AsyncClient`` and the httpx2 clients. With
    ``expect``, a request is refused with :class:`BindingMismatch` before anything is sent when the
    stored entry belongs to another identity.
    """

    __slots__ = ("_coordinators", "_expect", "_session_id")

    def __init__(self, engine: Coordinators, session_id: str, expect: Binding | None = None) -> None:
        self._coordinators = engine
        self._session_id = session_id
        self._expect = expect

    @property
    def session_id(self) -> str:
        """The session whose tokens this auth sends."""
        return self._session_id

    def __repr__(self) -> str:
        return f"UpstreamAuth(provider_id={self._coordinators.core.provider_id!r}, expect={self._expect!r})"


class AuthSource(Protocol):
    """What the transports take: something that makes an :class:`UpstreamAuth` (a ``TokenManager``)."""

    def auth(self, session_id: str, expect: Binding | None = None) -> UpstreamAuth:
        """An auth for ``session_id``."""
        ...
