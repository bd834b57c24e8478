"""The exceptions raised by httpx-upstream-auth.

Every error is a subclass of ``UpstreamAuthError``, so one ``except`` catches them all::

    UpstreamAuthError
    ├── ReauthenticationRequired   the user must log in again (no entry, no refresh token, dead grant)
    ├── RefreshFailed              the refresh could not complete now; ``retryable`` says whether to retry
    │   └── ConfigurationError     it cannot work until a setting is fixed (token URL, client, TLS, proxy)
    ├── BindingMismatch            the entry belongs to another identity than the caller expects
    └── StorageError               the token store failed; nothing was half-written
        └── EntryRefused           an encrypted store holds an entry that fails authentication (moved,
                                   relabelled, tampered with, sealed by a key not configured), plaintext,
                                   or older than one this process saw (rolled back)

Messages say what happened and what to do next. They never contain a token: callers log them freely.
"""

from __future__ import annotations

__all__ = [
    "BindingMismatch",
    "ConfigurationError",
    "EntryRefused",
    "ReauthenticationRequired",
    "RefreshFailed",
    "StorageError",
    "UnreadableEntry",
    "UpstreamAuthError",
]


class UpstreamAuthError(Exception):
    """Base class of every error this library raises."""


class ReauthenticationRequired(UpstreamAuthError):
    """The stored grant cannot be used any more: send the user through the login flow again.

    Raised when there is no entry for the session, the entry has no refresh token, or the provider
    answered that the grant is dead (``invalid_grant``, revoked). The stored entry is kept for inspection.
    """


class RefreshFailed(UpstreamAuthError):
    """The refresh could not complete now (network, 5xx, 429, timeout, malformed response).

    ``retryable`` is true when the same call may succeed later (network trouble, 5xx, 429, timeout)
    and false when a configuration change is needed (bad client credentials, a token URL that is
    refused). ``may_have_rotated`` is true when the request may have reached the provider and its
    answer was lost or unusable (a read timeout, a 200 that could not be read): the provider may have
    consumed the refresh token, so the manager removes the entry rather than present it again.
    Otherwise stored tokens are untouched. ``retry_after`` is how many seconds the provider asked to wait
    (its ``Retry-After``), when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        may_have_rotated: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code
        self.may_have_rotated = may_have_rotated
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # copy.copy (each waiter gets its own copy) and pickle rebuild an exception as ``cls(*args)``;
        # ours has keyword-only fields, so say how to rebuild it.
        fields = (type(self), str(self), self.retryable, self.status_code, self.may_have_rotated, self.retry_after)
        return (_rebuild_refresh_failed, fields, self.__dict__)


def _rebuild_refresh_failed(
    cls: type[RefreshFailed],
    message: str,
    retryable: bool,
    status_code: int | None,
    may_have_rotated: bool,
    retry_after: float | None = None,
) -> RefreshFailed:
    return cls(
        message,
        retryable=retryable,
        status_code=status_code,
        may_have_rotated=may_have_rotated,
        retry_after=retry_after,
    )


class ConfigurationError(RefreshFailed):
    """The refresh cannot work until a setting is fixed; retrying as it is cannot help (never ``retryable``).

    ``setting`` names what to check: ``"token_url"`` (a 404, a redirect, a host name that does not exist),
    ``"client"`` (``invalid_client``, ``unauthorized_client``: client_id, client_secret, auth_method),
    ``"scope"`` (``invalid_scope``), ``"tls"`` (the token endpoint's certificate was refused: ``verify=``)
    or ``"proxy"`` (the proxy refused the request: its URL and credentials). Nothing was consumed, and
    stored tokens are untouched. A :class:`TokenManager` remembers it for all its sessions for
    ``failure_window`` seconds: callers meanwhile get it at once, without a call to the token endpoint.
    """

    def __init__(self, message: str, *, setting: str, status_code: int | None = None) -> None:
        super().__init__(message, retryable=False, status_code=status_code)
        self.setting = setting

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_configuration_error, (type(self), str(self), self.setting, self.status_code), self.__dict__)


def _rebuild_configuration_error(
    cls: type[ConfigurationError], message: str, setting: str, status_code: int | None
) -> ConfigurationError:
    return cls(message, setting=setting, status_code=status_code)


class BindingMismatch(UpstreamAuthError):
    """The stored entry, or a refreshed id_token, names another identity than the caller expects.

    Nothing is sent to the upstream API and nothing is stored.
    """


class StorageError(UpstreamAuthError):
    """The token store failed. Nothing was half-written: retry when the store is back."""


class UnreadableEntry(StorageError):
    """The store holds an entry that cannot be read (a torn write, another version's format). Retrying will
    not help: delete the entry and have the user log in again. The message names the provider, never the
    session id (which may be a bearer secret) nor the entry's content."""


class EntryRefused(StorageError):
    """An :class:`EncryptedStorage` refused the stored entry: it is never returned as tokens.

    ``reason`` says why: ``"unauthentic"`` (the ciphertext fails authentication: moved to another session,
    its identity fields relabelled, or tampered with), ``"unknown_key"`` (sealed by a key id that is not
    configured: a key removed too early, or another deployment's), ``"malformed"`` (not a ciphertext this
    version writes), ``"plaintext"`` (an unencrypted entry, with ``allow_plaintext=False``) or ``"rollback"``
    (authentic, but older than a version of the entry this process read or wrote: an older copy written back,
    see :class:`EncryptedStorage`). ``key_id`` is the key id the ciphertext names (``None`` for plaintext or
    malformed ones), ``version`` the stored version, which :meth:`TokenManager.store` uses to replace the entry
    with a new login's tokens. The entry stays in the store (for inspection, or for a key put back);
    :meth:`TokenManager.delete` removes it. It does not read as absent.
    """

    def __init__(
        self, message: str, *, reason: str = "unauthentic", key_id: str | None = None, version: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id
        self.version = version
