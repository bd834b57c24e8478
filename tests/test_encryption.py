"""Encryption at rest: the storage contract through EncryptedStorage on every backend, then what encryption adds
(nothing readable in the raw store, rotation, refused ciphertexts, migration, the manager over real HTTP)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest
from redis_servers import RedisServer
from storage_fixtures import REPO, redis_server
from support import SESSION, SSL, ManagerFactory, aput_entry, expired, put_entry, stored

from httpx_upstream_auth import (
    EncryptedStorage,
    EncryptionKey,
    EntryKey,
    EntryRefused,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RedisStorage,
    Reencrypted,
    SQLiteStorage,
    Storage,
    StorageError,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread
from httpx_upstream_auth.testing.contract import StorageContract

__all__ = ["redis_server"]  # a fixture used below

HOUR = 3600.0
KEY = EntryKey("local", SESSION)
OLD = EncryptionKey(bytes(range(32)), "old")
NEW = EncryptionKey(bytes(range(100, 132)), "new")
#: How key material could show in a text: raw, hex, base64.
SPELLINGS = [
    spelling
    for key in (OLD, NEW)
    for spelling in (key.secret.hex(), base64.b64encode(key.secret).decode(), repr(key.secret))
]


def opener_source(inner: str, keys: list[EncryptionKey]) -> str:
    """Python source that opens ``inner`` (source binding ``storage``) wrapped with ``keys``."""
    given = ", ".join(f"EncryptionKey({key.secret!r}, {key.key_id!r})" for key in keys)
    return (
        f"{inner}from httpx_upstream_auth import EncryptedStorage, EncryptionKey\n"
        f"storage = EncryptedStorage(storage, [{given}])\n"
    )


# -- the contract, through the wrapper, on each backend ---------------------------------------------------
class TestEncryptedMemory(StorageContract):
    """The contract on EncryptedStorage over MemoryStorage."""

    def make_storage(self, **options: Any) -> Storage:
        if options:
            return EncryptedStorage(MemoryStorage(**options), [NEW])
        if not hasattr(self, "shared"):
            self.shared = EncryptedStorage(MemoryStorage(), [NEW])
        return self.shared


class TestEncryptedSQLite(StorageContract):
    """The contract on EncryptedStorage over a SQLite file of the test's own."""

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "tokens.db")

    def make_storage(self, **options: Any) -> Storage:
        return EncryptedStorage(SQLiteStorage(self.path, **options), [NEW, OLD])

    def opener(self) -> str:
        inner = f"from httpx_upstream_auth import SQLiteStorage\nstorage = SQLiteStorage({self.path!r})\n"
        return opener_source(inner, [NEW, OLD])

    def disable_rechecks(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        assert isinstance(storage, EncryptedStorage)
        monkeypatch.setattr(storage.inner, "recheck_interval", HOUR)


class TestEncryptedRedis(StorageContract):
    """The contract on EncryptedStorage over a real redis-server, under a key prefix of the test's own."""

    @pytest.fixture(autouse=True)
    def _prefix(self, redis_server: RedisServer) -> None:
        self.url = redis_server.url
        self.prefix = f"e{uuid.uuid4().hex[:10]}"

    def make_storage(self, **options: Any) -> Storage:
        return EncryptedStorage(RedisStorage.from_url(self.url, prefix=self.prefix, **options), [NEW])

    def opener(self) -> str:
        inner = (
            "from httpx_upstream_auth import RedisStorage\n"
            f"storage = RedisStorage.from_url({self.url!r}, prefix={self.prefix!r})\n"
        )
        return opener_source(inner, [NEW])

    def disable_rechecks(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        assert isinstance(storage, EncryptedStorage)
        monkeypatch.setattr(storage.inner, "recheck_interval", HOUR)


# -- what the backend holds ---------------------------------------------------------------------------------
def full_entry(version: int = 1, **fields: Any) -> UpstreamTokens:
    """An entry with every secret field set, easy to search for."""
    values: dict[str, Any] = {
        "access_token": "secret-access-XYZ",
        "refresh_token": "secret-refresh-XYZ",
        "id_token": "secret-id-XYZ",
        "provider_id": "local",
        "user_id": "u-1",
        "upstream_subject": "alice",
        "client_id": "test-client",
        "expires_at": 1.9e9,
        "version": version,
    }
    values.update(fields)
    return UpstreamTokens(**values)


def test_the_backend_holds_sealed_secrets_and_readable_versions_and_times() -> None:
    """The backend's entry has no secret in any field, keeps the version, times and identity as they are, and
    names the key that sealed it; reading through the wrapper gives back the entry, field for field."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW, OLD])
    entry = full_entry(7, refresh_expires_at=1.95e9, scope="api")
    assert storage.put(KEY, entry, expected_version=None)
    raw = inner.get(KEY)
    assert raw is not None
    assert "secret" not in json.dumps(raw.to_dict())
    assert raw.refresh_token is None and raw.id_token is None
    assert raw.access_token.startswith("hua-aesgcm-1.new.")
    assert (raw.version, raw.expires_at, raw.refresh_expires_at, raw.scope) == (7, 1.9e9, 1.95e9, "api")
    assert (raw.user_id, raw.upstream_subject, raw.client_id) == ("u-1", "alice", "test-client")
    assert storage.get(KEY) == entry
    assert storage.put(KEY, entry, expected_version=None) is False  # compare-and-set on the backend's version
    assert (storage.encryptions, storage.decryptions) == (2, 1)
    assert storage.key_ids == ["new", "old"]
    heard: list[str | None] = []
    storage.subscribe(heard.append)
    storage.notify_change(KEY)
    assert heard == [KEY.digest]


def test_every_seal_is_a_new_ciphertext() -> None:
    """The same entry sealed twice gives two ciphertexts (a fresh nonce each time)."""
    storage = EncryptedStorage(MemoryStorage(), [NEW])
    assert storage.seal(KEY, full_entry()).access_token != storage.seal(KEY, full_entry()).access_token


# -- refused ciphertexts ----------------------------------------------------------------------------------
def test_a_ciphertext_moved_to_another_session_is_refused() -> None:
    """An entry copied, as the backend holds it, to another session's key fails authentication: EntryRefused
    (a StorageError), never the tokens; the entry stays, and a delete still removes it."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW])
    storage.put(KEY, full_entry(), expected_version=None)
    raw = inner.get(KEY)
    assert raw is not None
    elsewhere = EntryKey("local", "session-of-mallory")
    assert inner.put(elsewhere, raw, expected_version=None)
    with pytest.raises(EntryRefused) as caught:
        storage.get(elsewhere)
    assert isinstance(caught.value, StorageError)
    assert (caught.value.reason, caught.value.key_id, caught.value.version) == ("unauthentic", "new", 1)
    assert "secret" not in str(caught.value)
    other_provider = EntryKey("another", SESSION)
    assert inner.put(other_provider, raw, expected_version=None)
    with pytest.raises(EntryRefused, match="failed authentication"):
        storage.get(other_provider)
    assert storage.delete(elsewhere) is True
    assert storage.get(KEY) == full_entry()


@pytest.mark.parametrize(
    "relabel",
    [
        {"user_id": "u-2"},
        {"upstream_subject": "mallory"},
        {"client_id": "other-client"},
        {"provider_id": "other"},
        {"issuer": "https://evil.example"},
        {"token_type": "Other"},
    ],
)
def test_a_relabelled_entry_is_refused(relabel: dict[str, str]) -> None:
    """Rewriting an identity field (or the issuer, or the token type) next to the ciphertext is refused."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW])
    storage.put(KEY, full_entry(), expected_version=None)
    raw = inner.get(KEY)
    assert raw is not None
    assert inner.put(KEY, attrs.evolve(raw, version=2, **relabel), expected_version=1)
    with pytest.raises(EntryRefused) as caught:
        storage.get(KEY)
    assert caught.value.reason == "unauthentic" and caught.value.version == 2


def test_tampered_and_malformed_ciphertexts_are_refused() -> None:
    """A flipped byte, a ciphertext cut short, one that is not base64, and one that opens to something that is
    not an entry's secrets: each is refused, typed."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW])
    storage.put(KEY, full_entry(), expected_version=None)
    raw = inner.get(KEY)
    assert raw is not None
    prefix, key_id, text = raw.access_token.split(".")
    flipped = text[:-2] + ("A" if text[-2] != "A" else "B") + text[-1]
    nonce = bytes(12)
    cases: dict[str | bytes, str] = {
        flipped: "unauthentic",
        text[:10]: "unauthentic",
        "A": "unauthentic",
        b'{"access_token": 7}': "malformed",  # sealed below, as the wrapper would, around something else
        b"not json": "malformed",
    }
    for replacement, reason in cases.items():
        current = inner.get(KEY)
        assert current is not None
        forged = attrs.evolve(raw, version=current.version + 1)
        if isinstance(replacement, bytes):
            sealed = NEW_CIPHER().encrypt(nonce, replacement, associated_data(KEY, forged, "new"))
            replacement = base64.urlsafe_b64encode(nonce + sealed).decode()
        forged = attrs.evolve(forged, access_token=f"{prefix}.{key_id}.{replacement}")
        assert inner.put(KEY, forged, expected_version=current.version)
        with pytest.raises(EntryRefused) as caught:
            storage.get(KEY)
        assert caught.value.reason == reason, replacement


def NEW_CIPHER() -> Any:
    """An AES-GCM cipher over the NEW key, to forge ciphertexts as a holder of the key could."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(NEW.secret)


def associated_data(key: EntryKey, tokens: UpstreamTokens, key_id: str) -> bytes:
    """The associated data docs/security-storage.md describes for a ciphertext of ``tokens`` under ``key``."""
    bound = [
        "hua-aesgcm-1", key_id, key.provider_id, key.session_id, tokens.provider_id, tokens.user_id,
        tokens.upstream_subject, tokens.client_id, tokens.issuer, tokens.token_type, tokens.version,
    ]  # fmt: skip
    return json.dumps(bound, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def test_an_older_ciphertext_cannot_pose_as_the_current_version() -> None:
    """The version is sealed with the secrets: an older ciphertext put back under the current version number (so
    that compare-and-set and the rollback check see nothing amiss) fails authentication."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW], track_versions=0)
    storage.put(KEY, full_entry(1), expected_version=None)
    old = inner.get(KEY)
    assert old is not None
    storage.put(KEY, attrs.evolve(full_entry(2), access_token="at-2"), expected_version=1)
    assert inner.put(KEY, attrs.evolve(old, version=3), expected_version=2)
    with pytest.raises(EntryRefused) as caught:
        storage.get(KEY)
    assert (caught.value.reason, caught.value.version) == ("unauthentic", 3)


def test_an_older_copy_written_back_is_refused_as_a_rollback_by_whoever_saw_a_newer_one() -> None:
    """An older sealed copy written back whole (its own version with it) authenticates, but the wrapper that read
    or wrote a newer version refuses it (``rollback``), naming both versions and no secret; a wrapper that never
    saw the newer one (another process, a restart) cannot tell, nor one with ``track_versions=0``."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW])
    storage.put(KEY, full_entry(1), expected_version=None)
    old = inner.get(KEY)
    assert old is not None
    newer = attrs.evolve(full_entry(2), access_token="at-2", refresh_token="rt-2")
    assert storage.put(KEY, newer, expected_version=1)
    assert inner.put(KEY, old, expected_version=2)
    with pytest.raises(EntryRefused) as caught:
        storage.get(KEY)
    assert (caught.value.reason, caught.value.key_id, caught.value.version) == ("rollback", "new", 1)
    assert "version 1" in str(caught.value) and "version 2" in str(caught.value) and "secret" not in str(caught.value)
    assert EncryptedStorage(inner, [NEW]).get(KEY) == full_entry(1)  # never saw version 2
    assert EncryptedStorage(inner, [NEW], track_versions=0).get(KEY) == full_entry(1)
    assert storage.put(KEY, newer, expected_version=1)  # put right (a login): its own write is the mark again
    assert storage.get(KEY) == newer


def test_a_rotation_does_not_seal_a_rolled_back_entry_anew() -> None:
    """``reencrypt`` counts a rolled-back entry as refused and leaves it as it is (sealed again with the new key, it
    would still be the old tokens)."""
    inner = MemoryStorage()
    EncryptedStorage(inner, [OLD]).put(KEY, full_entry(1), expected_version=None)
    old = inner.get(KEY)
    rotating = EncryptedStorage(inner, [NEW, OLD])
    assert rotating.put(KEY, full_entry(2), expected_version=1)
    assert old is not None and inner.put(KEY, old, expected_version=2)
    assert rotating.reencrypt() == Reencrypted(refused=1)
    assert inner.get(KEY) == old


def test_a_logged_out_entry_written_back_is_refused() -> None:
    """A deleted entry's last version is remembered: the sealed copy from before the logout, written back, is
    refused, and so is an older one (another reader's, before the deletion); a new write reads again."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW])
    storage.put(KEY, full_entry(1), expected_version=None)
    first = inner.get(KEY)
    storage.put(KEY, full_entry(2), expected_version=1)
    last = inner.get(KEY)
    assert first is not None and last is not None and storage.get(KEY) == full_entry(2)
    assert storage.delete(KEY) is True
    assert inner.put(KEY, first, expected_version=None)
    with pytest.raises(EntryRefused, match="older than version 2"):
        storage.get(KEY)
    assert inner.delete(KEY)
    assert inner.put(KEY, last, expected_version=None)  # the very copy deleted: same version, not a rollback
    assert storage.get(KEY) == full_entry(2)
    assert storage.put(KEY, full_entry(3), expected_version=2) and storage.get(KEY) == full_entry(3)


def test_the_rollback_check_remembers_a_bounded_number_of_entries() -> None:
    """``track_versions`` bounds the table: the least recently seen entry is forgotten first, and its rollback is
    then accepted (the documented limit); 0 keeps none; other values are refused."""
    inner = MemoryStorage()
    storage = EncryptedStorage(inner, [NEW], track_versions=2)
    keys = [EntryKey("local", f"s{n}") for n in range(3)]
    copies = []
    for key in keys:
        storage.put(key, full_entry(1), expected_version=None)
        copies.append(inner.get(key))
        storage.put(key, full_entry(2), expected_version=1)
    for key, copy in zip(keys, copies, strict=True):
        assert copy is not None and inner.put(key, copy, expected_version=2)
    for key in keys[1:]:  # the table holds s1 and s2
        with pytest.raises(EntryRefused, match="older"):
            storage.get(key)
    assert storage.get(keys[0]) == full_entry(1)  # forgotten
    for wrong in (-1, 1.5, True):
        with pytest.raises(ValueError, match="track_versions"):
            EncryptedStorage(inner, [NEW], track_versions=wrong)  # type: ignore[arg-type]


def test_an_entry_sealed_by_a_key_not_configured_is_refused() -> None:
    """Without the key that sealed it, an entry is refused as unknown_key, naming its key id."""
    inner = MemoryStorage()
    EncryptedStorage(inner, [OLD]).put(KEY, full_entry(), expected_version=None)
    with pytest.raises(EntryRefused, match="'old'") as caught:
        EncryptedStorage(inner, [NEW]).get(KEY)
    assert (caught.value.reason, caught.value.key_id, caught.value.version) == ("unknown_key", "old", 1)


# -- rotation and migration ---------------------------------------------------------------------------------
def test_key_rotation_reads_old_entries_then_reencrypt_moves_them_to_the_new_key(tmp_path: Path) -> None:
    """Entries sealed by the old key read with [new, old]; new writes use the new key; reencrypt rewrites the old
    ones (same version), after which the new key alone reads every entry."""
    path = tmp_path / "tokens.db"
    before = EncryptedStorage(SQLiteStorage(path), [OLD])
    keys = [EntryKey("local", f"s-{number}") for number in range(4)] + [EntryKey("local", "lone-\udc00")]
    for number, key in enumerate(keys):
        assert before.put(key, full_entry(10 + number, access_token=f"secret-{number}"), expected_version=None)
    before.close()

    rotating = EncryptedStorage(SQLiteStorage(path), [NEW, OLD])
    assert rotating.get(keys[0]) == full_entry(10, access_token="secret-0")
    assert rotating.put(keys[0], full_entry(11, access_token="secret-0b"), expected_version=10)
    assert rotating.reencrypt() == Reencrypted(rewritten=4, current=1)
    assert rotating.reencrypt([*keys, EntryKey("local", "never")]) == Reencrypted(current=5, missing=1)
    rotating.close()

    after = EncryptedStorage(SQLiteStorage(path), [NEW])
    assert [after.get(key) for key in keys[1:]] == [
        full_entry(10 + number, access_token=f"secret-{number}") for number in range(1, 5)
    ]
    old_only = EncryptedStorage(SQLiteStorage(path), [OLD])
    with pytest.raises(EntryRefused, match="not configured"):
        old_only.get(keys[3])
    after.close()
    old_only.close()


def test_reencrypt_counts_refused_entries_and_entries_that_keep_changing() -> None:
    """An entry no configured key opens is left as it is (refused); one rewritten under every attempt counts as
    changed; a backend that cannot list its keys asks for them."""
    inner = MemoryStorage()
    EncryptedStorage(inner, [OLD]).put(KEY, full_entry(), expected_version=None)
    storage = EncryptedStorage(inner, [NEW])
    assert storage.reencrypt() == Reencrypted(refused=1)

    class Busy(MemoryStorage):
        def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
            return False  # someone else always wrote first

        def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
            return Storage.scan(self, provider_id)

    busy = Busy()
    MemoryStorage.put(busy, KEY, full_entry(), expected_version=None)
    wrapped = EncryptedStorage(busy, [NEW], allow_plaintext=True)
    assert wrapped.reencrypt([KEY]) == Reencrypted(changed=1)
    with pytest.raises(NotImplementedError, match="cannot list its entries"):
        wrapped.reencrypt()


def test_plaintext_entries_read_only_while_migrating(tmp_path: Path) -> None:
    """An unencrypted entry is refused by default (reason plaintext), read with allow_plaintext=True, and
    sealed by reencrypt; after that the default reads it."""
    path = tmp_path / "tokens.db"
    plain = SQLiteStorage(path)
    plain.put(KEY, full_entry(), expected_version=None)
    with pytest.raises(EntryRefused, match="unencrypted") as caught:
        EncryptedStorage(plain, [NEW]).get(KEY)
    assert caught.value.reason == "plaintext" and caught.value.key_id is None
    migrating = EncryptedStorage(plain, [NEW], allow_plaintext=True)
    assert migrating.get(KEY) == full_entry()
    assert migrating.reencrypt() == Reencrypted(rewritten=1)
    assert EncryptedStorage(plain, [NEW]).get(KEY) == full_entry()
    plain.close()
    # SQLite may keep the old row's bytes in the write-ahead log and in free pages until they are reused (whether
    # they are still there depends on its checkpoints): the documented clean-up after a migration removes them.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
    assert b"secret-refresh-XYZ" not in raw_sqlite(path)
    assert b"hua-aesgcm-1.new." in raw_sqlite(path)


def raw_sqlite(path: Path) -> bytes:
    """Every byte the SQLite store keeps on disk: the file and its write-ahead log."""
    return b"".join(file.read_bytes() for file in path.parent.glob(path.name + "*"))


# -- keys and configuration ---------------------------------------------------------------------------------
def test_keys_are_checked_and_never_shown() -> None:
    """Key sizes and ids are checked (without echoing the key); reprs show key ids only; a generated key is new
    each time; a storage needs a key, distinct ids, and a backend that is not itself encrypted."""
    with pytest.raises(ValueError, match="16, 24 or 32 bytes") as caught:
        EncryptionKey(b"x" * 31)
    assert "xxxx" not in str(caught.value)
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        EncryptionKey("a string" * 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_id"):
        EncryptionKey(bytes(32), "has space")
    first, second = EncryptionKey.generate(), EncryptionKey.generate("g2")
    assert first.secret != second.secret and second.key_id == "g2"
    assert EncryptionKey(first.secret).key_id == first.key_id and first.key_id.startswith("k")
    assert EncryptionKey(bytes(16)).key_id != EncryptionKey(bytes(24)).key_id
    with pytest.raises(ValueError, match="at least one key"):
        EncryptedStorage(MemoryStorage(), [])
    with pytest.raises(ValueError, match="same key_id"):
        EncryptedStorage(MemoryStorage(), [NEW, EncryptionKey(bytes(32), "new")])
    storage = EncryptedStorage(MemoryStorage(), [NEW.secret, OLD])
    with pytest.raises(ValueError, match="encrypted already"):
        EncryptedStorage(storage, [NEW])
    for text in (repr(NEW), repr(OLD), repr(storage), str(storage)):
        assert not any(spelling in text for spelling in SPELLINGS)
    assert repr(OLD) == "EncryptionKey(key_id='old')"


def test_without_cryptography_the_package_imports_and_the_wrapper_names_the_extra() -> None:
    """With cryptography missing, the package imports and EncryptedStorage says which extra to install."""
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from httpx_upstream_auth import EncryptedStorage, MemoryStorage\n"
        "try:\n    EncryptedStorage(MemoryStorage(), [bytes(32)])\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "pip install 'httpx-upstream-auth[crypto]'" in result.stdout


# -- the manager through an encrypted store, over real HTTP -----------------------------------------------
def herd(server: ServerThread, manager: TokenManager, threads: int, requests: int, session: str = SESSION) -> list[int]:
    """``threads`` threads sharing one httpx.Client, ``requests`` API calls each; their statuses."""
    statuses: list[int] = []
    barrier = threading.Barrier(threads)
    limits = httpx.Limits(max_connections=threads)
    auth = manager.auth(session)
    with httpx.Client(base_url=server.url, auth=auth, limits=limits, timeout=30, verify=SSL) as client:

        def worker() -> None:
            barrier.wait()
            for _ in range(requests):
                statuses.append(client.get("/api/me").status_code)

        running = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
    return statuses


def test_sqlite_file_holds_no_token_and_a_herd_refreshes_once_decrypting_only_on_reads(
    tmp_path: Path, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """Through an encrypted SQLite store: 16 threads on an expired token make one refresh with no reuse; the
    cached token is then served without decrypting again; no token ever issued shows in the file's bytes."""
    path = tmp_path / "tokens.db"
    storage = EncryptedStorage(SQLiteStorage(path), [NEW])
    manager = make_manager(storage=storage)
    provider.token_delay = 0.1
    put_entry(manager, expired(provider.login()))
    assert herd(server, manager, 16, 5) == [200] * 80
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
    opened = storage.decryptions
    for _ in range(200):
        manager.get_token(SESSION)
    assert herd(server, manager, 4, 25) == [200] * 100
    assert storage.decryptions == opened, "the hot path decrypted a cached entry"
    assert storage.encryptions == 2  # the login's entry and the refresh's
    raw = raw_sqlite(path)
    issued = provider.issued_tokens
    assert len(issued) == 4 and not [token for token in issued if token.encode() in raw]
    assert b"hua-aesgcm-1.new." in raw


def test_redis_values_hold_no_token(
    redis_server: RedisServer, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """Through an encrypted Redis store, after a login, a refresh and a second session: no Redis value under the
    prefix contains any token the provider issued, and the sessions' requests succeed."""
    import redis

    prefix = f"e{uuid.uuid4().hex[:10]}"
    storage = EncryptedStorage(RedisStorage.from_url(redis_server.url, prefix=prefix), [NEW])
    manager = make_manager(storage=storage)
    put_entry(manager, expired(provider.login()))
    manager.store("second", provider.login(sub="bob"))
    assert herd(server, manager, 4, 5) == [200] * 20
    assert herd(server, manager, 2, 2, session="second") == [200] * 4
    assert provider.stats["refresh_ok"] == 1
    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{prefix}:{{old}}:entry", "d", '{"access_token":"x"}')  # written before ids were kept inside
    client.hset(f"{prefix}:{{odd}}:entry", "d", '{"entry_key":[1,2]}')
    values = b""
    for name in client.scan_iter(match=f"{prefix}:*"):
        if client.type(name) == b"hash":
            values += b"".join(
                value if isinstance(value, bytes) else value.encode() for value in client.hgetall(name).values()
            )
    client.close()
    assert b"hua-aesgcm-1.new." in values
    assert not [token for token in provider.issued_tokens if token.encode() in values]
    assert sorted(key.session_id for key in storage.scan()) == ["second", SESSION]  # the odd ones left out


def test_an_entry_moved_to_another_session_is_never_sent_and_a_login_replaces_it(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """Alice's sealed entry copied under Bob's session: Bob's request raises EntryRefused and sends nothing to the
    API or the token endpoint; Bob's next login replaces the refused entry; a logout removes one too."""
    inner = MemoryStorage()
    manager = make_manager(storage=EncryptedStorage(inner, [NEW]))
    manager.store(SESSION, provider.login())
    raw = inner.get(KEY)
    assert raw is not None
    assert inner.put(EntryKey("local", "bob"), raw, expected_version=None)
    with (
        httpx.Client(base_url=server.url, auth=manager.auth("bob"), verify=SSL) as client,
        pytest.raises(EntryRefused),
    ):
        client.get("/api/me")
    assert provider.api_calls["/api/me"] == 0 and provider.stats["token_calls"] == 0
    manager.store("bob", provider.login(sub="bob"))
    assert herd(server, manager, 1, 1, session="bob") == [200]
    assert manager.get_token("bob").upstream_subject == "bob"
    assert inner.put(EntryKey("local", "carol"), raw, expected_version=None)
    assert manager.delete("carol") is True


def test_a_rolled_back_entry_is_refused_before_its_consumed_refresh_token_is_presented(
    tmp_path: Path, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """Someone with write access puts back the SQLite row from before a refresh: the manager that refreshed refuses
    it (EntryRefused, ``rollback``) instead of presenting the consumed refresh token, which would make the provider
    revoke the grant; a new login replaces it. A logged-out session written back is refused the same way."""
    inner = SQLiteStorage(tmp_path / "tokens.db")
    manager = make_manager(storage=EncryptedStorage(inner, [NEW]))
    manager.store(SESSION, expired(provider.login()))
    before = inner.get(KEY)
    assert before is not None
    manager.get_token(SESSION)  # a refresh over HTTP: the stored version moves on
    current = inner.get(KEY)
    assert current is not None and current.version == before.version + 1
    assert inner.put(KEY, before, expected_version=current.version)
    with pytest.raises(EntryRefused) as caught:
        manager.refresh(SESSION)
    assert (caught.value.reason, caught.value.version) == ("rollback", before.version)
    stats = provider.stats
    assert (stats["token_calls"], stats["refresh_ok"], stats["refresh_reuse"]) == (1, 1, 0)
    manager.store(SESSION, provider.login())
    assert herd(server, manager, 1, 1) == [200]
    last = inner.get(KEY)
    assert manager.delete(SESSION) is True and last is not None
    assert inner.put(KEY, before, expected_version=None)
    with pytest.raises(EntryRefused, match="older"):
        manager.get_token(SESSION)
    assert provider.api_calls["/api/me"] == 1 and provider.stats["token_calls"] == 1


def test_plaintext_sessions_keep_working_during_the_migration(
    tmp_path: Path, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """Sessions stored before encryption keep working with allow_plaintext=True (a refresh seals the entry); the
    rest are sealed by reencrypt; then a manager without allow_plaintext serves them all."""
    path = tmp_path / "tokens.db"
    before = make_manager(storage=SQLiteStorage(path))
    put_entry(before, expired(provider.login()))
    before.store("other", provider.login(sub="bob"))
    before.close()

    migrating_storage = EncryptedStorage(SQLiteStorage(path), [NEW], allow_plaintext=True)
    migrating = make_manager(storage=migrating_storage)
    assert herd(server, migrating, 2, 2) == [200] * 4  # refreshed, and sealed by that write
    assert herd(server, migrating, 1, 1, session="other") == [200]
    assert migrating_storage.reencrypt() == Reencrypted(rewritten=1, current=1)
    migrating.close()

    after = make_manager(storage=EncryptedStorage(SQLiteStorage(path), [NEW]))
    assert herd(server, after, 1, 2) == [200] * 2
    assert herd(server, after, 1, 2, session="other") == [200] * 2
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    assert stored(after) is not None


def test_no_key_material_in_logs_or_errors(
    caplog: pytest.LogCaptureFixture, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """With every logger at DEBUG, a refresh, a refused entry and a logout log no key material and no token, and
    the refused entry's error holds none either."""
    caplog.set_level(logging.DEBUG)
    inner = MemoryStorage()
    manager = make_manager(storage=EncryptedStorage(inner, [NEW, OLD]))
    put_entry(manager, expired(provider.login()))
    assert herd(server, manager, 1, 1) == [200]
    EncryptedStorage(inner, [EncryptionKey.generate("gone")]).put(
        EntryKey("local", "lost"), provider.login(), expected_version=None
    )
    with pytest.raises(EntryRefused) as caught:
        manager.get_token("lost")
    with pytest.raises(ReauthenticationRequired):
        manager.get_token("never-stored")
    manager.delete(SESSION)
    texts = [caplog.text, str(caught.value), repr(caught.value)]
    secrets = [*SPELLINGS, *provider.issued_tokens]
    assert not [secret for secret in secrets for text in texts if secret in text]
    assert caught.value.reason == "unknown_key"


@pytest.fixture
def encrypted_redis(redis_server: RedisServer) -> EncryptedStorage:
    """An encrypted Redis store under a prefix of the test's own (made outside the event loop: it opens clients)."""
    return EncryptedStorage(RedisStorage.from_url(redis_server.url, prefix=f"e{uuid.uuid4().hex[:10]}"), [NEW])


@pytest.mark.anyio
async def test_a_herd_of_tasks_through_an_encrypted_redis_store_refreshes_once(
    encrypted_redis: EncryptedStorage, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """100 asyncio or trio tasks on an expired token, through an encrypted Redis store: one refresh, no reuse, 100
    answers; the entry was opened for the herd's read and the job's, never for a cached token."""
    storage = encrypted_redis
    manager = make_manager(storage=storage)
    await aput_entry(manager, expired(provider.login()))
    provider.token_delay = 0.1
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(
        base_url=server.url, auth=manager.auth(SESSION), limits=limits, timeout=30, verify=SSL
    ) as client:

        async def one() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
        opened = storage.decryptions
        for _ in range(20):
            assert (await client.get("/api/me")).status_code == 200
    assert statuses == [200] * 100
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
    assert storage.decryptions == opened
    assert manager.footprint().lost_claims == 0


# -- several processes over one encrypted store -----------------------------------------------------------
WORKER = str(Path(__file__).with_name("mp_worker.py"))
#: The key the workers are given (its id derived from it, as the workers derive it).
SHARED = EncryptionKey(NEW.secret)


def spawn_worker(*args: str) -> subprocess.Popen[str]:
    """A tests/mp_worker.py process whose storage is encrypted with the SHARED key."""
    # This checkout's package, whatever the environment has installed.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HUA_ENCRYPTION_KEY": base64.b64encode(SHARED.secret).decode()}
    return subprocess.Popen(
        [sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def worker_result(process: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for a worker; its JSON line."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def seed_shared(provider: LocalProvider, path: Path) -> UpstreamTokens:
    """Alice's expired tokens, sealed into the SQLite file the workers share."""
    storage = EncryptedStorage(SQLiteStorage(path), [SHARED])
    manager = TokenManager(
        refresher=OAuth2Refresher("http://127.0.0.1:1/token", "test-client", "test-secret"),
        provider_id="local",
        storage=storage,
    )
    try:
        return manager.store("shared", expired(provider.login()))
    finally:
        manager.close()


def test_another_process_refreshes_a_sealed_entry_and_this_one_reads_its_result(tmp_path: Path) -> None:
    """A worker process opens the sealed entry, refreshes it and seals the result; this process reads it."""
    provider = LocalProvider()
    path = tmp_path / "tokens.db"
    with ServerThread(provider) as server:
        seeded = seed_shared(provider, path)
        child = worker_result(spawn_worker("token", f"sqlite:{path}", server.url))
    assert child["version"] == seeded.version + 1 and child["refresh_token"] != seeded.refresh_token
    storage = EncryptedStorage(SQLiteStorage(path), [SHARED])
    again = storage.get(EntryKey("local", "shared"))
    storage.close()
    assert again is not None and again.to_dict() == child
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    assert not [token for token in provider.issued_tokens if token.encode() in raw_sqlite(path)]


@pytest.mark.slow
def test_four_processes_share_one_refresh_per_expiry_through_an_encrypted_store(tmp_path: Path) -> None:
    """4 processes x 25 tasks, 1-second tokens, 8 s, over one encrypted SQLite file: no reuse, no failure, the
    expiries crossed refreshed; no token in the file."""
    provider = LocalProvider(access_ttl=1.0)
    path = tmp_path / "tokens.db"
    with ServerThread(provider) as server:
        seed_shared(provider, path)
        start = str(time.time() + 3)
        workers = [spawn_worker("herd", f"sqlite:{path}", server.url, "8", "25", "0.25", start) for _ in range(4)]
        results = [worker_result(worker) for worker in workers]
        stats = provider.stats
    assert stats["refresh_reuse"] == 0, stats
    assert [r["errors"] for r in results if r["failed"]] == []
    assert all(int(r["ok"]) > 0 for r in results), results
    assert stats["refresh_ok"] >= 2, stats
    assert not [token for token in provider.issued_tokens if token.encode() in raw_sqlite(path)]


def test_a_key_rotation_does_not_seal_a_planted_plaintext_entry() -> None:
    """Someone with write access plants an unencrypted entry; the operator rotates keys and re-encrypts with
    the default wrapper: the planted entry is counted as refused, left unsealed, and still refused on reads."""
    inner = MemoryStorage()
    EncryptedStorage(inner, [OLD]).put(KEY, full_entry(), expected_version=None)
    planted = EntryKey("local", "planted")
    inner.put(planted, full_entry(), expected_version=None)
    rotating = EncryptedStorage(inner, [NEW, OLD])
    assert rotating.reencrypt() == Reencrypted(rewritten=1, refused=1)
    with pytest.raises(EntryRefused) as caught:
        rotating.get(planted)
    assert caught.value.reason == "plaintext"
    assert rotating.get(KEY) == full_entry()
