# Generated from _async by tests/unasync_twins.py: do not edit.
"""The sync transport (generated from the async one): the auth flow for code that takes a transport."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx

from .._auth import AuthSource
from .._models import Binding

if TYPE_CHECKING:
    _TransportBase = httpx.BaseTransport
    httpx2: Any = None
else:
    try:
        import httpx2
    except ImportError:
        httpx2 = None
    if httpx2 is None or httpx2.BaseTransport is httpx.BaseTransport:  # absent, or aliased to httpx
        _TransportBase = httpx.BaseTransport
    else:  # so httpx2 clients (and type checks against httpx2) take it as one of their own transports

        class _TransportBase(httpx.BaseTransport, httpx2.BaseTransport):
            pass


__all__ = ["UpstreamAuthTransport"]

logger = logging.getLogger("httpx_upstream_auth")

#: ``(scheme, host, port)``, the port filled in when the URL leaves it to the scheme.
_Origin = tuple[str, str, int | None]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: Any) -> _Origin:
    """The origin of an httpx or httpx2 URL."""
    scheme = url.scheme.lower()
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(scheme)
    return scheme, url.host.lower(), port


def _parse_origin(origin: str | httpx.URL) -> _Origin:
    url = httpx.URL(str(origin))
    extra = url.raw_path not in (b"", b"/") or url.query or url.fragment or url.userinfo
    if url.scheme.lower() not in _DEFAULT_PORTS or not url.host or extra:
        raise ValueError(f"not an origin (scheme://host[:port]): {str(origin)!r}")
    return _origin_of(url)


class UpstreamAuthTransport(_TransportBase):
    """Wrap an inner transport so requests to the upstream API carry the session's upstream token.

    For ``mounts=`` (one upstream among several hosts) and SDKs that accept a transport but not an
    ``auth=``. It drives the same flow as :class:`UpstreamAuth`: refresh when needed, replay once on a
    Bearer 401 when the body can be replayed.

    **Origins.** A transport sits below the client's redirect handling, so it also sees the requests of
    followed redirects, which may go to other hosts. Only requests to the API's origins (scheme, host and
    port) get the token; any other request is forwarded as it is, its own ``Authorization`` header (if
    any) untouched. Pass ``origins=["https://api.example.com"]`` to name them; without it, the origin of
    the first request this transport handles is the one, for the transport's life. Pass ``origins`` when
    the transport serves several hosts (a ``mounts=`` pattern such as ``"all://*.example.com"``), or when
    a client may send its first request elsewhere: that request would otherwise pin the wrong origin.
    The token (and a DPoP proof) is set for the one send and taken off the caller's request when the
    exchange ends, so a redirect the client follows never carries it: each hop to the API's origin gets a
    token and a proof of its own (made for the hop's URL), every other hop only the caller's own headers.

    **Inner transport.** Without ``transport=``, a default one is made on first use for each client
    library: an ``httpx.HTTPTransport`` for httpx requests, an ``httpx2.HTTPTransport`` for
    httpx2 requests, so one object works under ``httpx.Client`` and ``httpx2.Client``. A
    ``transport=`` given must fit the client it is used with.

    Every response the caller does not get back (a 401 before the replay, or the 401 whose refresh
    failed or was cancelled) is closed, so its pooled connection is released.
    """

    def __init__(
        self,
        manager: AuthSource,
        session_id: str,
        *,
        transport: httpx.BaseTransport | None = None,
        origins: Iterable[str | httpx.URL] | None = None,
        expect: Binding | None = None,
    ) -> None:
        if isinstance(origins, (str, httpx.URL)):
            raise TypeError("origins= takes a list of origins, such as ['https://api.example.com']")
        self._auth = manager.auth(session_id, expect)
        self._transport = transport
        self._origins = None if origins is None else frozenset(_parse_origin(origin) for origin in origins)
        if self._origins is not None and not self._origins:
            raise ValueError("origins= is empty: the transport would authenticate nothing")
        # Guards pinning the first origin and making the default transports; never held across a blocking call.
        self._lock = threading.Lock()
        self._defaults: dict[str, httpx.BaseTransport] = {}  # by client library: "httpx", "httpx2"

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the token if it goes to the API's origin, replaying once after a rejected token."""
        inner = self._inner_for(request)
        if not self._is_for_api(request):
            return inner.handle_request(request)
        own = request.headers.copy()  # as the caller made them
        flow = self._auth.sync_auth_flow(request)
        try:
            request = flow.__next__()
            while True:
                response = inner.handle_request(request)
                try:
                    request = flow.send(response)
                except StopIteration:
                    return response
                except BaseException:
                    # The refresh failed or the caller was cancelled: the 401 still holds its connection.
                    response.close()
                    raise
                response.close()
        finally:
            flow.close()
            # The client builds a followed redirect's request from this one once we return: our token and
            # proof must not travel on it (httpx drops Authorization on a hop to another origin, not DPoP,
            # and keeps both on an http -> https hop). A hop to the API's origin comes back here and gets
            # a token and a proof of its own; any other goes out with the caller's headers only.
            request.headers = own

    def close(self) -> None:
        """Close the inner transport (the given one, or each default one made)."""
        if self._transport is not None:
            self._transport.close()
        for inner in list(self._defaults.values()):
            inner.close()

    def _is_for_api(self, request: httpx.Request) -> bool:
        origin = _origin_of(request.url)
        origins = self._origins
        if origins is None:
            with self._lock:
                if self._origins is None:
                    self._origins = frozenset([origin])
                origins = self._origins
        if origin in origins:
            return True
        logger.debug("request to %s://%s:%s is not for the upstream API; sent without its token", *origin)
        return False

    def _inner_for(self, request: httpx.Request) -> httpx.BaseTransport:
        if self._transport is not None:
            return self._transport
        library = "httpx" if isinstance(request, httpx.Request) else "httpx2"
        inner = self._defaults.get(library)
        if inner is None:
            if library == "httpx2" and (httpx2 is None or not isinstance(request, httpx2.Request)):
                raise TypeError(f"cannot send a {type(request).__qualname__}: pass transport= to fit your client")
            with self._lock:
                inner = self._defaults.get(library)
                if inner is None:
                    inner = httpx.HTTPTransport() if library == "httpx" else httpx2.HTTPTransport()
                    self._defaults[library] = inner
        return inner
