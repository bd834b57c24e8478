"""Where to refresh, found from the MCP server's URL: RFC 9728, then RFC 8414 / OpenID discovery.

Path-aware and strict: metadata is fetched only from the well-known URLs the RFCs define for the
resource and its issuer, the issuer in the answer must be the one asked for, and when nothing is found
discovery fails instead of guessing ``{origin}/token``. Needs no MCP SDK: only httpx.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
import httpx

from .._exceptions import RefreshFailed, UpstreamAuthError
from .._models import EntryKey, UpstreamTokens
from .._storages import Storage

__all__ = [
    "DiscoveryFailed",
    "IssuerMismatch",
    "MetadataStore",
    "ServerMetadata",
    "adiscover",
    "authorization_server_metadata_urls",
    "discover",
    "protected_resource_metadata_urls",
    "resource_metadata_from_challenge",
]

logger = logging.getLogger("httpx_upstream_auth.mcp")

MAX_METADATA_BYTES = 64 * 1024
_CHALLENGE_PARAM = re.compile(r'resource_metadata\s*=\s*(?:"([^"]*)"|([^\s,]+))', re.IGNORECASE)


class DiscoveryFailed(RefreshFailed):
    """The token endpoint could not be discovered from the server's metadata.

    ``retryable`` when the metadata could not be fetched now (network, 5xx, 429); not when the server
    publishes none or publishes metadata that does not check out (then configure ``token_url``).
    """


class IssuerMismatch(DiscoveryFailed):
    """The MCP server now leads to another authorization server than the one the credentials belong to.

    Raised before anything is sent there: a refresh token and a client secret go only to the issuer
    that produced them (a compromised MCP server could otherwise name its own). Not retryable.
    ``expected`` is the issuer the credentials (or your ``issuer=`` pin) belong to; ``found`` the one
    the server's metadata names now (``None`` when it names several, none of them ``expected``).
    """

    def __init__(self, server_url: str, expected: str, found: str | None, *, message: str | None = None) -> None:
        named = "another authorization server" if found is None else f"authorization server {found}"
        super().__init__(
            message
            or f"the MCP server {server_url} now names {named}, but these credentials belong to {expected}; "
            "nothing was sent there. If the server really moved, check with its operator, then log the user in "
            "again against the new issuer (SDKLogin(allow_issuer_change=True)) or change the issuer= pin.",
            retryable=False,
        )
        self.server_url = server_url
        self.expected = expected
        self.found = found

    def __reduce__(self) -> tuple[object, ...]:
        fields = (self.server_url, self.expected, self.found, str(self))
        return (_rebuild_issuer_mismatch, fields, self.__dict__)


def _rebuild_issuer_mismatch(server_url: str, expected: str, found: str | None, message: str) -> IssuerMismatch:
    return IssuerMismatch(server_url, expected, found, message=message)


def issuers_match(a: str, b: str) -> bool:
    """Whether two issuer identifiers name the same server: equal strings (RFC 8414 section 3.3), a root
    issuer with or without its trailing slash counting as one."""
    if a == b:
        return True
    return a.rstrip("/") == b.rstrip("/") and urlsplit(a).path in ("", "/") and urlsplit(b).path in ("", "/")


@attrs.frozen(kw_only=True)
class ServerMetadata:
    """What discovery found for one MCP server (the protected resource) and its authorization server."""

    server_url: str
    """The MCP server URL discovery started from."""
    resource: str | None
    """The resource identifier the server names (RFC 9728), sent as ``resource`` (RFC 8707) on refresh."""
    issuer: str
    """The authorization server's issuer identifier."""
    token_endpoint: str
    """Where to refresh."""
    authorization_endpoint: str | None = None
    """Where a login starts (interactive clients)."""
    registration_endpoint: str | None = None
    """Dynamic client registration (RFC 7591), when offered."""
    revocation_endpoint: str | None = None
    """Token revocation (RFC 7009), when offered and usable (https, or loopback as for the token endpoint)."""
    token_endpoint_auth_methods: tuple[str, ...] = ()
    """Client authentication methods the token endpoint accepts (empty: not said)."""
    code_challenge_methods: tuple[str, ...] = ()
    """PKCE methods the authorization server supports (empty: not said, so no login there by the MCP spec)."""
    discovered_at: float = 0.0
    """When it was discovered (epoch seconds)."""

    def to_json(self) -> str:
        """Serialize (for storage)."""
        data = attrs.asdict(self)
        data["token_endpoint_auth_methods"] = list(self.token_endpoint_auth_methods)
        data["code_challenge_methods"] = list(self.code_challenge_methods)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerMetadata:
        """Rebuild from :meth:`to_json` output; unknown keys are ignored."""
        data = json.loads(text)
        names = {f.name for f in attrs.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["token_endpoint_auth_methods"] = tuple(data.get("token_endpoint_auth_methods") or ())
        data["code_challenge_methods"] = tuple(data.get("code_challenge_methods") or ())
        return cls(**data)


def _origin_and_path(url: str, what: str = "a URL discovery was given") -> tuple[str, str]:
    """``(origin, path)`` of an http(s) URL; :class:`DiscoveryFailed` for anything else (the value is not echoed:
    it may come from a server, and an error text is no place for what it sent)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # an invalid port raises ValueError here rather than later
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)
    except (ValueError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise DiscoveryFailed(f"{what} is not an http(s) URL", retryable=False)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def is_secure_url(url: str) -> bool:
    """Whether a bearer secret may travel to ``url``: ``https``, or plain ``http`` to a loopback host."""
    scheme = urlsplit(url).scheme.lower()
    return scheme == "https" or (scheme == "http" and is_loopback(url))


def may_contact(url: str, server_url: str) -> bool:
    """Whether discovery or a login for the MCP server at ``server_url`` may send a request to ``url``: ``https``;
    plain ``http`` only to a loopback host, and only for a server that is itself on loopback (a development
    setup). A remote server must not make this client probe its own machine's services."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return False
    return scheme == "https" or (scheme == "http" and is_loopback(url) and is_loopback(server_url))


def check_may_contact(url: str, server_url: str, what: str = "metadata URL") -> None:
    """:class:`DiscoveryFailed` unless :func:`may_contact` allows ``url`` (nothing is sent to it)."""
    if not may_contact(url, server_url):
        where = "this MCP server is on loopback" if is_loopback(server_url) else "the MCP server is remote"
        raise DiscoveryFailed(
            f"a {what} is not https (plain http is allowed only to loopback, and only when the MCP server is on "
            f"loopback; {where}); nothing was sent to it",
            retryable=False,
        )


def resource_metadata_from_challenge(www_authenticate: str | None) -> str | None:
    """The ``resource_metadata`` URL of a Bearer challenge (RFC 9728 section 5.1), if it names one."""
    if not www_authenticate:
        return None
    match = _CHALLENGE_PARAM.search(www_authenticate)
    return None if match is None else match.group(1) or match.group(2)


def screen_challenge(www_authenticate: str, server_url: str) -> str:
    """``www_authenticate`` without its ``resource_metadata`` parameters when any names another origin than the MCP
    server's, for a client (the SDK's login) that would fetch it wherever it points."""
    origin, _ = _origin_and_path(server_url, "the MCP server URL")
    named = [m.group(1) or m.group(2) or "" for m in _CHALLENGE_PARAM.finditer(www_authenticate)]
    if all(_same_origin(url, origin) for url in named):
        return www_authenticate
    logger.warning("ignored a resource_metadata URL on another origin than the MCP server %s", origin)
    return _CHALLENGE_PARAM.sub("", www_authenticate)


def protected_resource_metadata_urls(server_url: str, www_authenticate: str | None = None) -> list[str]:
    """Where to look for the server's RFC 9728 metadata, in order.

    The challenge's ``resource_metadata`` first when it is on the server's own origin (a URL elsewhere is
    ignored: a server's 401 must not make the client fetch arbitrary URLs, such as internal ones), then
    the path-aware well-known URL (``{origin}/.well-known/oauth-protected-resource{path}``), then the
    root one.
    """
    origin, path = _origin_and_path(server_url, "the MCP server URL")
    urls = []
    named = resource_metadata_from_challenge(www_authenticate)
    if named and _same_origin(named, origin):
        urls.append(named)
    elif named:
        logger.warning("ignored a resource_metadata URL on another origin than the MCP server %s", origin)
    if path:
        urls.append(f"{origin}/.well-known/oauth-protected-resource{path}")
    urls.append(f"{origin}/.well-known/oauth-protected-resource")
    return list(dict.fromkeys(urls))


def _same_origin(url: str, origin: str) -> bool:
    try:
        other, _ = _origin_and_path(url)
    except DiscoveryFailed:
        return False
    return other.lower() == origin.lower()


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """Where to look for an issuer's metadata, in order: RFC 8414 (path inserted after the well-known
    prefix), OpenID Connect in the same form, then OpenID Connect Discovery (path, then well-known).
    An issuer that is not an http(s) URL without query or fragment (RFC 8414 section 2) raises
    :class:`DiscoveryFailed`."""
    origin, path = _origin_and_path(issuer, "the authorization server's issuer")
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise DiscoveryFailed(
            "the authorization server's issuer has a query or fragment, which RFC 8414 forbids", retryable=False
        )
    if not path:
        return [f"{origin}/.well-known/oauth-authorization-server", f"{origin}/.well-known/openid-configuration"]
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}/.well-known/openid-configuration{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    ]


def _resource_matches(server_url: str, resource: str) -> bool:
    # RFC 9728 section 3.3: the resource must be the server itself or a parent of it (same origin, path prefix).
    server_origin, server_path = _origin_and_path(server_url, "the MCP server URL")
    try:
        origin, path = _origin_and_path(resource)
    except DiscoveryFailed:
        return False  # not even a URL: not this server
    if "#" in resource:
        return False  # RFC 8707 section 2: a resource indicator has no fragment
    return server_origin.lower() == origin.lower() and (server_path + "/").startswith(path + "/")


def _read_json(answer: tuple[int, bytes], url: str) -> dict[str, Any] | None:
    """The JSON object of a 200 answer; ``None`` for 404/405/410 and similar "not here" answers."""
    status, content = answer
    if status >= 500 or status == 429:
        message = f"metadata at {url} answered {status}; try again later"
        raise DiscoveryFailed(message, retryable=True, status_code=status)
    if status != 200:
        return None
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays, a cheap way to crash a parser
        return None
    return data if isinstance(data, dict) else None


def _prm_result(server_url: str, url: str, data: dict[str, Any], issuer: str | None) -> tuple[str | None, str]:
    servers = data.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
        raise DiscoveryFailed(f"protected-resource metadata at {url} names no authorization server", retryable=False)
    chosen = servers[0]
    if issuer is not None:
        # Decided before any authorization-server metadata is fetched: a server we do not trust gets nothing.
        listed = [s for s in servers if issuers_match(s, issuer)]
        if not listed:
            raise IssuerMismatch(server_url, issuer, servers[0] if len(servers) == 1 else None)
        chosen = listed[0]
    resource = data.get("resource")
    if not isinstance(resource, str):  # required by RFC 9728 section 3.2: without it nothing can be checked
        raise DiscoveryFailed(
            f"protected-resource metadata at {url} has no resource member (RFC 9728 requires it); ask the "
            "server's operator to publish it, or pass token_url explicitly",
            retryable=False,
        )
    if not _resource_matches(server_url, resource):
        raise DiscoveryFailed(
            f"protected-resource metadata at {url} is for another resource than {server_url}", retryable=False
        )
    authorization_server_metadata_urls(chosen)  # a usable issuer identifier, or DiscoveryFailed now
    return resource, chosen


def _asm_result(
    server_url: str, resource: str | None, issuer: str, url: str, data: dict[str, Any], now: float
) -> ServerMetadata:
    if not isinstance(data.get("issuer"), str) or not issuers_match(data["issuer"], issuer):
        # What it names instead is not repeated: the answer may come from a service the server pointed us at.
        raise DiscoveryFailed(
            f"authorization-server metadata at {url} names another issuer than {issuer}", retryable=False
        )
    token_endpoint = data.get("token_endpoint")
    if not isinstance(token_endpoint, str):
        raise DiscoveryFailed(f"authorization-server metadata at {url} has no token_endpoint", retryable=False)
    _origin_and_path(token_endpoint, f"the token_endpoint of the authorization-server metadata at {url}")
    check_may_contact(token_endpoint, server_url, "token endpoint")

    def text(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) else None

    def texts(name: str) -> tuple[str, ...]:
        value = data.get(name)  # RFC 8414: a JSON array of strings; anything else counts as not said
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

    return ServerMetadata(
        server_url=server_url,
        resource=resource,
        issuer=data["issuer"],
        token_endpoint=token_endpoint,
        authorization_endpoint=text("authorization_endpoint"),
        registration_endpoint=text("registration_endpoint"),
        revocation_endpoint=_usable_endpoint(text("revocation_endpoint"), server_url),
        token_endpoint_auth_methods=texts("token_endpoint_auth_methods_supported"),
        code_challenge_methods=texts("code_challenge_methods_supported"),
        discovered_at=now,
    )


def _usable_endpoint(url: str | None, server_url: str) -> str | None:
    """``url`` when secrets may be sent there (as to the token endpoint), else ``None``: an optional endpoint that
    cannot be used is left out rather than failing discovery (refreshes do not need it)."""
    if url is None:
        return None
    try:
        _origin_and_path(url)
    except DiscoveryFailed:
        return None
    return url if may_contact(url, server_url) else None


def _no_metadata(what: str, urls: list[str]) -> DiscoveryFailed:
    return DiscoveryFailed(
        f"no {what} metadata at {', '.join(urls)}; pass the token URL explicitly (nothing is guessed)",
        retryable=False,
    )


async def adiscover(
    server_url: str,
    *,
    www_authenticate: str | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: float = 10.0,
    now: float | None = None,
    issuer: str | None = None,
) -> ServerMetadata:
    """Discover the token endpoint (and more) of the MCP server at ``server_url``.

    RFC 9728 protected-resource metadata (from the 401 challenge's ``resource_metadata`` when
    ``www_authenticate`` is given, else the well-known URLs), then the named authorization server's
    RFC 8414 / OpenID metadata. With ``issuer``, only that authorization server is accepted: when the
    resource's metadata does not list it, :class:`IssuerMismatch` is raised before anything else is
    fetched. Raises :class:`DiscoveryFailed`.
    """
    import time

    own = client is None
    http = httpx.AsyncClient(timeout=timeout, follow_redirects=False) if client is None else client
    try:
        prm_urls = protected_resource_metadata_urls(server_url, www_authenticate)
        for url in prm_urls:
            check_may_contact(url, server_url)
            data = _read_json(await _aget(http, url), url)
            if data is not None:
                resource, issuer = _prm_result(server_url, url, data, issuer)
                break
        else:
            raise _no_metadata("protected-resource", prm_urls)
        asm_urls = authorization_server_metadata_urls(issuer)
        for url in asm_urls:
            check_may_contact(url, server_url)
            data = _read_json(await _aget(http, url), url)
            if data is not None:
                return _asm_result(server_url, resource, issuer, url, data, time.time() if now is None else now)
        raise _no_metadata("authorization-server", asm_urls)
    finally:
        if own:
            await http.aclose()


def discover(
    server_url: str,
    *,
    www_authenticate: str | None = None,
    client: httpx.Client | None = None,
    timeout: float = 10.0,
    now: float | None = None,
    issuer: str | None = None,
) -> ServerMetadata:
    """Blocking twin of :func:`adiscover`."""
    import time

    own = client is None
    http = httpx.Client(timeout=timeout, follow_redirects=False) if client is None else client
    try:
        prm_urls = protected_resource_metadata_urls(server_url, www_authenticate)
        for url in prm_urls:
            check_may_contact(url, server_url)
            data = _read_json(_get(http, url), url)
            if data is not None:
                resource, issuer = _prm_result(server_url, url, data, issuer)
                break
        else:
            raise _no_metadata("protected-resource", prm_urls)
        asm_urls = authorization_server_metadata_urls(issuer)
        for url in asm_urls:
            check_may_contact(url, server_url)
            data = _read_json(_get(http, url), url)
            if data is not None:
                return _asm_result(server_url, resource, issuer, url, data, time.time() if now is None else now)
        raise _no_metadata("authorization-server", asm_urls)
    finally:
        if own:
            http.close()


def _too_large(url: str) -> DiscoveryFailed:
    return DiscoveryFailed(f"metadata at {url} is larger than {MAX_METADATA_BYTES} bytes", retryable=False)


def _declared_too_large(response: httpx.Response) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > MAX_METADATA_BYTES


async def _aget(http: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
    # Streamed, so the size cap stops the read: a huge (or endless) answer costs at most the cap.
    try:
        async with http.stream("GET", url, headers={"accept": "application/json"}) as response:
            if response.status_code != 200:
                return response.status_code, b""
            if _declared_too_large(response):
                raise _too_large(url)
            body = bytearray()
            # Closed here when the cap stops the read, not left to the garbage collector (trio warns then);
            # httpx types it as an iterator, but it is a generator.
            async with contextlib.aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes())) as chunks:
                async for chunk in chunks:
                    body += chunk
                    if len(body) > MAX_METADATA_BYTES:
                        raise _too_large(url)
            return 200, bytes(body)
    except httpx.HTTPError as exc:
        raise DiscoveryFailed(f"could not fetch metadata at {url}: {type(exc).__name__}", retryable=True) from exc


def _get(http: httpx.Client, url: str) -> tuple[int, bytes]:
    try:
        with http.stream("GET", url, headers={"accept": "application/json"}) as response:
            if response.status_code != 200:
                return response.status_code, b""
            if _declared_too_large(response):
                raise _too_large(url)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_METADATA_BYTES:
                    raise _too_large(url)
            return 200, bytes(body)
    except httpx.HTTPError as exc:
        raise DiscoveryFailed(f"could not fetch metadata at {url}: {type(exc).__name__}", retryable=True) from exc


class MetadataStore:
    """Keeps small JSON records (discovered metadata, client registrations) in a token :class:`Storage`.

    Records live under their own provider id (``namespace``), keyed by a name such as the server URL,
    so they never meet token entries; the JSON sits in the entry's hidden ``access_token`` field (it may
    hold a client secret). They share the storage's durability and reach: every process and host that
    shares the tokens shares them, and a restart finds them. Retention is the storage's (30 days by
    default after the last write): :meth:`atouch` rewrites a record that is still in use.
    """

    def __init__(self, storage: Storage, namespace: str) -> None:
        self.storage = storage
        """Where the records are kept."""
        self.namespace = namespace
        """The provider id the records are filed under."""

    def _key(self, name: str) -> EntryKey:
        return EntryKey(self.namespace, name)

    def _entry(self, record: str, version: int) -> UpstreamTokens:
        return UpstreamTokens(access_token=record, token_type="record", provider_id=self.namespace, version=version)

    async def aget(self, name: str) -> str | None:
        """The record saved under ``name``, or ``None``."""
        entry = await self.storage.aget(self._key(name))
        return None if entry is None else entry.access_token

    def get(self, name: str) -> str | None:
        """Blocking twin of :meth:`aget`."""
        entry = self.storage.get(self._key(name))
        return None if entry is None else entry.access_token

    async def aput(self, name: str, record: str) -> None:
        """Save ``record`` under ``name``, over any previous one."""
        key = self._key(name)
        for _ in range(5):
            current = await self.storage.aget(key)
            version = 0 if current is None else current.version
            entry = self._entry(record, version + 1)
            if await self.storage.aput(key, entry, expected_version=None if current is None else current.version):
                return
        raise _busy()

    async def aput_unless(self, name: str, record: str, keep: Callable[[str], bool]) -> str | None:
        """Save ``record`` under ``name`` unless the record saved there is one to ``keep`` (decided by ``keep``,
        atomically with the write: a compare-and-set); return the record kept, or ``None`` when ``record`` was
        saved."""
        key = self._key(name)
        for _ in range(5):
            current = await self.storage.aget(key)
            if current is not None and keep(current.access_token):
                return current.access_token
            version = 0 if current is None else current.version
            entry = self._entry(record, version + 1)
            if await self.storage.aput(key, entry, expected_version=None if current is None else current.version):
                return None
        raise _busy()

    async def atouch(self, name: str) -> bool:
        """Rewrite the record saved under ``name`` as it is, so the storage's retention starts again; ``False``
        when there is none (or it changed meanwhile: then it was just written anyway)."""
        key = self._key(name)
        current = await self.storage.aget(key)
        if current is None:
            return False
        entry = self._entry(current.access_token, current.version + 1)
        return await self.storage.aput(key, entry, expected_version=current.version)

    def touch(self, name: str) -> bool:
        """Blocking twin of :meth:`atouch`."""
        key = self._key(name)
        current = self.storage.get(key)
        if current is None:
            return False
        entry = self._entry(current.access_token, current.version + 1)
        return self.storage.put(key, entry, expected_version=current.version)

    async def adelete(self, name: str) -> None:
        """Forget the record saved under ``name`` (nothing happens when there is none)."""
        await self.storage.adelete(self._key(name))

    def delete(self, name: str) -> None:
        """Blocking twin of :meth:`adelete`."""
        self.storage.delete(self._key(name))

    def put(self, name: str, record: str) -> None:
        """Blocking twin of :meth:`aput`."""
        key = self._key(name)
        for _ in range(5):
            current = self.storage.get(key)
            version = 0 if current is None else current.version
            entry = self._entry(record, version + 1)
            if self.storage.put(key, entry, expected_version=None if current is None else current.version):
                return
        raise _busy()


def _busy() -> UpstreamAuthError:
    from .._exceptions import StorageError

    return StorageError("a metadata record kept changing while saving it; retry")
