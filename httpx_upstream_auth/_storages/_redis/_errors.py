"""How a Redis storage names its server and turns redis-py's failures into :class:`StorageError`.

Every message says what to fix, names the server by kind and address (never by its credentials), and
carries no token: a server may echo a command's arguments, and the arguments hold the tokens.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.parse
from collections.abc import Iterator
from typing import Any

from ..._exceptions import StorageError, UnreadableEntry
from ..._models import EntryKey, UpstreamTokens
from ._keys import read_entry

__all__ = ["ErrorMap", "describe_client", "describe_url"]


class ErrorMap:
    """redis-py's exceptions, sorted by what the user should do about them, for one server."""

    def __init__(self, redis: Any, where: str, *, cluster: bool, max_connections: int, socket_timeout: float) -> None:
        #: host:port (or the socket path) of the server; set again by ``from_url``, which knows it better.
        self.where = where
        self.cluster = cluster
        self._max_connections = max_connections
        self._socket_timeout = socket_timeout
        self._unreachable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.RedisClusterException,
            TimeoutError,
            OSError,
        )
        self._refused: type[BaseException] = redis.exceptions.RedisError
        # Both are ConnectionErrors in redis-py, but neither means "unreachable": say what to fix instead.
        self._bad_credentials: tuple[type[BaseException], ...] = tuple(
            getattr(redis.exceptions, name) for name in ("AuthenticationError", "AuthorizationError")
            if hasattr(redis.exceptions, name)
        )  # fmt: skip
        self._pool_full: tuple[type[BaseException], ...] = tuple(
            getattr(redis.exceptions, name) for name in ("MaxConnectionsError",) if hasattr(redis.exceptions, name)
        )
        #: What a server that refuses a command (an ACL without pub/sub rights) raises.
        self.response_error: type[BaseException] = redis.exceptions.ResponseError

    @property
    def server(self) -> str:
        """How messages name the server: kind and address, never credentials."""
        return f"Redis Cluster at {self.where}" if self.cluster else f"Redis at {self.where}"

    def busy(self, what: str) -> StorageError:
        """Every connection stayed busy for the socket timeout."""
        return StorageError(
            f"could not {what}: all {self._max_connections} connections to {self.server} stayed busy for "
            f"{self._socket_timeout:g}s; raise RedisStorage(max_connections=...), or look for slow commands"
        )

    def decode(self, key: EntryKey, raw: Any) -> UpstreamTokens | None:
        """The tokens an entry's JSON holds; StorageError when it cannot be read."""
        try:
            return read_entry(key, raw)
        except (ValueError, TypeError) as exc:
            raise UnreadableEntry(
                f"{self.server} holds an unreadable entry for provider {key.provider_id!r} "
                f"({type(exc).__name__}); delete it and have the user log in again"
            ) from None

    @contextlib.contextmanager
    def mapped(self, what: str, tokens: UpstreamTokens | None = None) -> Iterator[None]:
        """Turn redis-py failures inside the block into StorageError."""
        try:
            yield
        except StorageError:
            raise
        except self._bad_credentials as exc:
            raise StorageError(
                f"could not {what}: {self.server} refused the credentials ({type(exc).__name__}); check the "
                "username and password in the URL or client"
            ) from exc
        except self._pool_full as exc:
            raise self.busy(what) from exc
        except self._unreachable as exc:
            if _is_tls_failure(exc):
                raise StorageError(
                    f"could not {what}: the TLS handshake with {self.server} failed ({type(exc).__name__}); "
                    "check ssl_ca_certs (the CA that signed the server's certificate) and the host name"
                ) from exc
            raise StorageError(
                f"could not {what}: {self.server} unreachable ({type(exc).__name__}); retry when it is back"
            ) from exc
        except self._refused as exc:
            # A server may echo arguments ("unknown command …, with args beginning with: …"), and the
            # arguments hold the tokens: keep only the head of the message, and drop the cause.
            detail = str(exc).split(", with args", 1)[0][:200]
            secrets = [] if tokens is None else [tokens.access_token, tokens.refresh_token, tokens.id_token]
            for secret in secrets:
                if secret:
                    detail = detail.replace(secret, "<hidden>")
            if "db index is out of range" in detail.lower() or "invalid db index" in detail.lower():
                hint = "the database number in the URL (/N) does not exist on the server: use one below its "
                hint += "'databases' setting (16 by default), or /0 on a Cluster"
            else:
                hint = "check that its ACL allows EVALSHA, HGET, GET and PUBLISH on these keys and channels, "
                hint += "and that it has memory left"
            raise StorageError(
                f"could not {what}: {self.server} refused ({type(exc).__name__}: {detail}); {hint}"
            ) from None


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen) or "SSL" in str(seen)[:40]:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_url(url: str) -> str:
    """host:port (or the socket path) of ``url``, never its credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{host}:{port}"


def describe_client(client: Any) -> str:
    """host:port of a client passed in, never its credentials."""
    with contextlib.suppress(Exception):
        startup = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None)
        if startup:
            return ", ".join(sorted(startup))
        options = client.connection_pool.connection_kwargs
        if options.get("path"):
            return f"unix:{options['path']}"
        return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    return "(unknown address)"
