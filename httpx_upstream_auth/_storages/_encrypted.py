"""Encryption at rest: a storage wrapper that seals an entry's secrets (AES-GCM) before any backend sees them.

What is sealed: every field of :class:`UpstreamTokens` hidden from its repr (the access, refresh and ID
tokens; a secret field added later is sealed with them), as one AES-GCM ciphertext in the access-token
field, the other secret fields left empty. What stays readable: the version, the times, the scope, the
token type, the binding fields and the issuer. The backends need those as they are: compare-and-set reads
the version (Redis in a Lua script, SQLite in its own column), retention follows ``refresh_expires_at``,
and a change notice names the entry by its key's digest. So every backend keeps working unchanged, and
so do leases, watches and change notices, which this wrapper hands to the backend as they are.

The associated data binds a ciphertext to its place: the entry key (provider id and session id), the
identity fields (``provider_id``, ``user_id``, ``upstream_subject``, ``client_id``), the ``issuer``, the
``token_type`` and the entry's ``version``, plus the key id. A ciphertext copied to another session, or whose
identity fields or version were rewritten, fails authentication and is refused (:class:`EntryRefused`), never
returned as tokens.

An older sealed copy written back whole (its own version with it) authenticates: that is a rollback, which no
key can tell from the real thing. Each wrapper remembers the highest version it read or wrote per entry (a
bounded table) and refuses a lower one (``reason="rollback"``); what it never saw it cannot judge.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from .._changes import ChangeCallback
from .._exceptions import EntryRefused
from .._models import EntryKey, UpstreamTokens
from .._synchronization import ForkRegistry
from ._base import Lease, Storage, storable

__all__ = ["EncryptedStorage", "EncryptionKey", "Reencrypted"]

#: What a sealed access-token field starts with: the format and its version.
PREFIX = "hua-aesgcm-1"
_NONCE_BYTES = 12
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EXTRA_HINT = "pip install 'httpx-upstream-auth[crypto]'"
#: How many entries' highest versions an EncryptedStorage remembers by default (to refuse a rollback).
TRACK_VERSIONS = 10_000


def _secret_fields() -> tuple[str, ...]:
    # A field hidden from the entry's repr is a secret: it is sealed too (the tokens today, any added later).
    return tuple(field.name for field in attrs.fields(UpstreamTokens) if field.repr is not True)


SECRET_FIELDS = _secret_fields()


class EncryptionKey:
    """An AES key (16, 24 or 32 bytes; 32 advised) and the id that names it in every ciphertext it seals.

    ``key_id`` (letters, digits, ``-`` and ``_``, at most 64) defaults to one derived from the key by a
    one-way hash. The key itself never appears in a repr, a log line or an error. :meth:`generate` makes a
    new random 32-byte key; load a kept one with ``EncryptionKey(base64.b64decode(os.environ["TOKEN_KEY"]))``.
    """

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes, key_id: str | None = None) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) not in (16, 24, 32):
            raise ValueError("an encryption key must be 16, 24 or 32 bytes (32 advised: EncryptionKey.generate())")
        self._secret = bytes(secret)
        if key_id is None:
            key_id = "k" + hashlib.sha256(b"httpx-upstream-auth key id\0" + self._secret).hexdigest()[:15]
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise ValueError("key_id must be 1 to 64 letters, digits, '-' or '_'")
        self.key_id = key_id

    @classmethod
    def generate(cls, key_id: str | None = None) -> EncryptionKey:
        """A new random 256-bit key."""
        return cls(os.urandom(32), key_id)

    @property
    def secret(self) -> bytes:
        """The key material (keep it out of logs)."""
        return self._secret

    def __repr__(self) -> str:
        return f"EncryptionKey(key_id={self.key_id!r})"


@attrs.frozen
class Reencrypted:
    """What :meth:`EncryptedStorage.reencrypt` did, entry by entry."""

    rewritten: int = 0
    """Entries sealed again with the first key (they were plaintext, or sealed by another key)."""
    current: int = 0
    """Entries already sealed by the first key: left as they were."""
    missing: int = 0
    """Keys with no entry (gone meanwhile, or never written)."""
    refused: int = 0
    """Entries that could not be opened (see :class:`EntryRefused`): left as they were."""
    changed: int = 0
    """Entries that kept changing under the rewrite (a refresh or a login wrote them): run it again."""


class EncryptedStorage(Storage):
    """Any storage, with each entry's secrets sealed by AES-GCM (the ``[crypto]`` extra: ``cryptography``).

    ``inner`` is the backend (memory, SQLite, Redis, your own); ``keys`` the keys, newest first: entries
    are sealed with the first and opened with whichever one their key id names, so a key is rotated by
    putting a new one first, running :meth:`reencrypt`, then dropping the old one. Versions, compare-and-set,
    leases, watches and change notices are the backend's own, unchanged.

    An entry that fails authentication (moved to another session, its identity fields relabelled, tampered
    with), that names a key id not configured, or an unencrypted one unless ``allow_plaintext`` is set,
    raises :class:`EntryRefused`: it does not read as absent, so a removed key or an attack shows as an
    error, and the entry is kept until a login replaces it or a logout deletes it. ``allow_plaintext=True``
    reads unencrypted entries (written before encryption was turned on) during a migration: each is sealed
    at its next write, or at once by :meth:`reencrypt`; turn it off once :meth:`reencrypt` rewrote them all.

    **Rollback.** The version is sealed with the secrets, so an older ciphertext cannot pose as the current
    version; but an older copy written back whole (from a backup, a replica that lost writes, or by someone
    with write access to the store: a session revived after its logout, a consumed refresh token put back)
    authenticates. So this object remembers the highest version it read or wrote for each of the last
    ``track_versions`` entries, and refuses a lower one with :class:`EntryRefused` (``reason="rollback"``),
    logouts included (a deleted entry's last version is kept). Its own writes set the mark, so a new login
    through :meth:`TokenManager.store` replaces a refused entry. ``track_versions=0`` turns this off. A
    process that never read the newer version (a restart, an entry out of the table) cannot tell.

    :attr:`decryptions` and :attr:`encryptions` count the AES-GCM operations (a token manager serves cached
    tokens without reading the store, so its hot path decrypts nothing).
    """

    def __init__(
        self,
        inner: Storage,
        keys: Sequence[EncryptionKey | bytes],
        *,
        allow_plaintext: bool = False,
        track_versions: int = TRACK_VERSIONS,
    ) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - the dev environment has cryptography; tested in a subprocess
            raise ImportError(f"EncryptedStorage needs the cryptography package: {_EXTRA_HINT}") from None
        if isinstance(inner, EncryptedStorage):
            raise ValueError("the inner storage is encrypted already: give EncryptedStorage its backend")
        super().__init__(retention=inner.retention)
        given = [key if isinstance(key, EncryptionKey) else EncryptionKey(key) for key in keys]
        if not given:
            raise ValueError("EncryptedStorage needs at least one key (EncryptionKey.generate() makes one)")
        ids = [key.key_id for key in given]
        if len(set(ids)) != len(ids):
            raise ValueError("two keys have the same key_id: give each key an id of its own")
        if isinstance(track_versions, bool) or not isinstance(track_versions, int) or track_versions < 0:
            raise ValueError("track_versions must be a whole number of entries, 0 or more (0: no rollback check)")
        self.inner = inner
        """The backend that holds the sealed entries."""
        self.allow_plaintext = allow_plaintext
        """Whether unencrypted entries are read (during a migration)."""
        self.blocking = inner.blocking
        self._primary = given[0].key_id
        self.track_versions = track_versions
        """How many entries' highest versions are remembered to refuse a rollback (0: none)."""
        self._ciphers = {key.key_id: AESGCM(key.secret) for key in given}
        self._lock = threading.Lock()  # the counts and the version table; never held across I/O
        self._decryptions = 0
        self._encryptions = 0
        # The highest version read or written per entry (by digest: the session id is not kept), newest last.
        self._versions: OrderedDict[str, int] = OrderedDict()
        _forked.add(self)

    def _reset_in_child(self) -> None:  # pragma: no cover - runs in a forked child, which coverage does not follow
        # A parent thread may have held the lock at fork(); what the parent saw, the child has seen too.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EncryptedStorage({self.inner!r}, key_ids={list(self._ciphers)!r})"

    @property
    def key_ids(self) -> list[str]:
        """The configured key ids, the one that seals new entries first."""
        return list(self._ciphers)

    @property
    def decryptions(self) -> int:
        """How many entries this object has opened (AES-GCM decryptions attempted)."""
        return self._decryptions

    @property
    def encryptions(self) -> int:
        """How many entries this object has sealed."""
        return self._encryptions

    # -- sealing -----------------------------------------------------------------------------------------
    def seal(self, key: EntryKey, tokens: UpstreamTokens) -> UpstreamTokens:
        """``tokens`` as the backend stores them under ``key``: secrets sealed with the first key."""
        tokens = storable(tokens)
        secrets = {name: getattr(tokens, name) for name in SECRET_FIELDS}
        plain = json.dumps(secrets, separators=(",", ":"), sort_keys=True).encode("ascii")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._primary].encrypt(nonce, plain, _associated(self._primary, key, tokens))
        del plain, secrets
        with self._lock:
            self._encryptions += 1
        text = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        emptied: dict[str, Any] = {name: None for name in SECRET_FIELDS if name != "access_token"}
        return attrs.evolve(tokens, access_token=f"{PREFIX}.{self._primary}.{text}", **emptied)

    def unseal(self, key: EntryKey, stored: UpstreamTokens) -> UpstreamTokens:
        """The entry the backend holds under ``key``, opened; :class:`EntryRefused` when it cannot be."""
        head, dot, rest = stored.access_token.partition(".")
        if head != PREFIX or not dot:
            if _looks_sealed(stored.access_token):
                # A sealed value garbled on the way (prefix, separator, truncation) is neither plaintext to
                # serve nor to seal anew: its access token would be the ciphertext.
                raise EntryRefused(
                    f"the entry for provider {key.provider_id!r} looks sealed but its format marker is damaged "
                    f"(not {PREFIX}.<key id>.<ciphertext>); it was not used. Delete it and log the user in again",
                    reason="malformed",
                    version=stored.version,
                )
            if self.allow_plaintext:
                return stored
            raise EntryRefused(
                f"the store holds an unencrypted entry for provider {key.provider_id!r}, and this EncryptedStorage "
                "does not read plaintext (allow_plaintext=False); run reencrypt() with allow_plaintext=True, or log "
                "the user in again",
                reason="plaintext",
                version=stored.version,
            )
        key_id, _, text = rest.partition(".")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise EntryRefused(
                f"the entry for provider {key.provider_id!r} is sealed by key id {key_id[:64]!r}, which is not "
                f"configured (configured: {', '.join(self._ciphers)}); add that key back, or log the user in again",
                reason="unknown_key",
                key_id=key_id[:64],
                version=stored.version,
            )
        with self._lock:
            self._decryptions += 1
        opened = _open(cipher, text, _associated(key_id, key, stored))
        if opened is None:
            raise EntryRefused(
                f"the entry for provider {key.provider_id!r} failed authentication: the key configured as "
                f"{key_id!r} is not the one that sealed it (a mistyped or replaced key: configure the right one), "
                "or the ciphertext was moved from another session, its identity fields rewritten, or tampered with; "
                "it was not used. Check the key; otherwise log the user in again, and look into who can write the "
                "token store",
                reason="unauthentic",
                key_id=key_id,
                version=stored.version,
            )
        secrets = _secrets(opened)
        del opened
        if secrets is None:
            raise EntryRefused(
                f"the entry for provider {key.provider_id!r} opened to something that is not an entry's secrets",
                reason="malformed",
                key_id=key_id,
                version=stored.version,
            )
        return attrs.evolve(stored, **secrets)

    def _opened(self, key: EntryKey, stored: UpstreamTokens | None, floor: int | None) -> UpstreamTokens | None:
        if stored is None:
            return None
        opened = self.unseal(key, stored)
        self._check_version(key, stored, floor)
        return opened

    def _floor(self, key: EntryKey) -> int | None:
        """The lowest version a read of ``key`` starting now may find: the highest one seen before it."""
        if not self.track_versions:
            return None
        with self._lock:
            return self._versions.get(key.digest)

    def _check_version(self, key: EntryKey, stored: UpstreamTokens, floor: int | None) -> None:
        """Remember the version read; :class:`EntryRefused` when it is below ``floor``, the highest version seen
        before the read started (one written while it ran does not count: the read may predate it)."""
        if not self.track_versions:
            return
        version = stored.version
        if floor is None or version >= floor:
            with self._lock:
                self._mark(key, max(version, self._versions.get(key.digest, version)))
            return
        head, _, rest = stored.access_token.partition(".")
        raise EntryRefused(
            f"the store holds version {version} of an entry for provider {key.provider_id!r}, older than version "
            f"{floor} this process read or wrote: an older copy was written back (a restored backup, a replica that "
            "lost writes, or someone with write access to the store); it was not used. Log the user in again "
            "(TokenManager.store replaces it), and look into who can write the token store",
            reason="rollback",
            key_id=rest.partition(".")[0] if head == PREFIX else None,
            version=version,
        )

    def _wrote(self, key: EntryKey, version: int) -> None:
        """Our own write of ``version`` sets the mark, even lower (a login that replaced a refused entry)."""
        if self.track_versions:
            with self._lock:
                self._mark(key, version)

    def _mark(self, key: EntryKey, version: int) -> None:
        # Called with the lock held.
        self._versions[key.digest] = version
        self._versions.move_to_end(key.digest)
        if len(self._versions) > self.track_versions:
            self._versions.popitem(last=False)

    # -- the storage contract, through the backend ---------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """The backend's entry, opened (``None`` when absent); :class:`EntryRefused` when it cannot be."""
        floor = self._floor(key)
        return self._opened(key, self.inner.get(key), floor)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Seal, then compare-and-set in the backend."""
        sealed = self.seal(key, tokens)
        saved = self.inner.put(key, sealed, expected_version=expected_version)
        if saved:
            self._wrote(key, sealed.version)
        return saved

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """The backend's delete (nothing to open: an entry that cannot be opened can still be removed)."""
        return self.inner.delete(key, expected_version=expected_version)

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """The backend's lease."""
        return self.inner.acquire_lease(key, ttl)

    def release_lease(self, lease: Lease) -> None:
        """The backend's release."""
        self.inner.release_lease(lease)

    def renew_lease(self, lease: Lease) -> bool | None:
        """The backend's renewal."""
        return self.inner.renew_lease(lease)

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None] | None:
        """The backend's change notices (by key digest, which sealing leaves as it is)."""
        return self.inner.subscribe(callback)

    def notify_change(self, key: EntryKey | None) -> None:
        """Tell the backend's subscribers that ``key`` changed."""
        self.inner.notify_change(key)

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """The backend's watch (versions are stored in clear)."""
        self.inner.watch(key, version, timeout)

    def close(self) -> None:
        """Close the backend."""
        self.inner.close()

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """The backend's listing of its keys (nothing to open: keys are not sealed)."""
        return self.inner.scan(provider_id)

    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        """Async twin of :meth:`get`."""
        floor = self._floor(key)
        return self._opened(key, await self.inner.aget(key), floor)

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Async twin of :meth:`put`."""
        sealed = self.seal(key, tokens)
        saved = await self.inner.aput(key, sealed, expected_version=expected_version)
        if saved:
            self._wrote(key, sealed.version)
        return saved

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        return await self.inner.adelete(key, expected_version=expected_version)

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease`."""
        return await self.inner.aacquire_lease(key, ttl)

    async def arelease_lease(self, lease: Lease) -> None:
        """Async twin of :meth:`release_lease`."""
        await self.inner.arelease_lease(lease)

    async def arenew_lease(self, lease: Lease) -> bool | None:
        """Async twin of :meth:`renew_lease`."""
        return await self.inner.arenew_lease(lease)

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`."""
        await self.inner.awatch(key, version, timeout)

    def ascan(self, provider_id: str | None = None) -> AsyncIterator[EntryKey]:
        """Async twin of :meth:`scan`."""
        return self.inner.ascan(provider_id)

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        await self.inner.aclose()

    # -- migration and rotation ----------------------------------------------------------------------------
    def reencrypt(self, keys: Iterable[EntryKey] | None = None) -> Reencrypted:
        """Seal with the first key every entry that is plaintext or sealed by another key; blocking.

        ``keys`` are the entries to look at (default: every entry of the backend, listed by its
        :meth:`~Storage.scan`: memory, SQLite and Redis can). Each rewrite is a compare-and-set on the entry's
        version, which it keeps (only the ciphertext changes), so it is safe while managers refresh and log
        users in and out; an entry that keeps changing is counted in ``changed``. Unencrypted entries are sealed
        only by a wrapper made with ``allow_plaintext=True`` (the migration); otherwise they are counted in
        ``refused``: a routine key rotation must not seal an entry someone planted in the store.
        """
        counts = dict.fromkeys(("rewritten", "current", "missing", "refused", "changed"), 0)
        for key in self.scan() if keys is None else keys:
            counts[self._reencrypt_one(key)] += 1
        return Reencrypted(**counts)

    def _reencrypt_one(self, key: EntryKey) -> str:
        for _ in range(3):
            floor = self._floor(key)
            stored = self.inner.get(key)
            if stored is None:
                return "missing"
            if stored.access_token.startswith(f"{PREFIX}.{self._primary}."):
                return "current"
            try:
                opened = self.unseal(key, stored)  # plaintext only when allow_plaintext says so
                self._check_version(key, stored, floor)  # a rolled-back entry is not sealed anew either
            except EntryRefused:
                return "refused"
            if self.put(key, opened, expected_version=stored.version):
                return "rewritten"
        return "changed"


def _looks_sealed(access_token: str) -> bool:
    """True when an access token that is not a well-formed sealed value looks like one that was damaged: the
    format's name near its start (a byte lost, a case change), or its start the marker with up to three
    characters wrong. No real token looks so; a JWT starts ``eyJ``."""
    start = access_token[: len(PREFIX) + 1].lower()
    if "aesgcm" in access_token[:20].lower() or start == PREFIX:
        return True
    wrong = sum(a != b for a, b in zip(start, f"{PREFIX}.", strict=False)) + len(PREFIX) + 1 - len(start)
    return wrong <= 3


def _associated(key_id: str, key: EntryKey, tokens: UpstreamTokens) -> bytes:
    """The associated data: what a ciphertext is bound to (its key id, its entry key, the identity it names)."""
    bound = [
        PREFIX,
        key_id,
        key.provider_id,
        key.session_id,
        tokens.provider_id,
        tokens.user_id,
        tokens.upstream_subject,
        tokens.client_id,
        tokens.issuer,
        tokens.token_type,
        # Sealed with its version, an older ciphertext cannot be put back under the current one (which the
        # backends' compare-and-set and this wrapper's rollback check read): it must bring its own, older one.
        tokens.version,
    ]
    return json.dumps(bound, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _open(cipher: Any, text: str, associated: bytes) -> bytes | None:
    """The plaintext, or ``None`` when ``text`` is not a ciphertext that authenticates with ``associated``."""
    from cryptography.exceptions import InvalidTag

    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) <= _NONCE_BYTES:
        return None
    try:
        plain: bytes = cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated)
    except InvalidTag:
        return None
    return plain


def _secrets(plain: bytes) -> dict[str, Any] | None:
    """The sealed secret fields, or ``None`` when ``plain`` is not what :meth:`EncryptedStorage.seal` wrote."""
    try:
        data = json.loads(plain)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) or not data["access_token"]:
        return None
    return {name: data.get(name) for name in SECRET_FIELDS}


_forked: ForkRegistry[EncryptedStorage] = ForkRegistry(EncryptedStorage._reset_in_child)
