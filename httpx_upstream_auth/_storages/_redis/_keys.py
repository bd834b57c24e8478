"""Where a Redis storage keeps an entry, its lease and its change messages, and the Lua that changes them.

An entry is a hash under ``{prefix}:{<digest>}:entry`` (``<digest>`` is :attr:`EntryKey.digest`: no
session id in a key name), the lease ``…:lease``; the ``{…}`` hash tag keeps both in one Cluster slot.
Every save and delete publishes ``<digest> <origin>`` on ``{prefix}:changes``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..._models import EntryKey, UpstreamTokens
from ..._policy import retention_deadline
from .._base import storable

__all__ = ["SCRIPTS", "KeyLayout", "blob", "entry_key_of", "ms", "read_entry"]

#: SLOWLOG keeps the first 128 bytes of each argument: the entry's JSON starts with that much blank.
_SLOWLOG_ARGUMENT = 128

# Compare-and-set. KEYS[1]: the entry, a hash of 'v' (the version, a decimal string compared as a
# string: exact at any size, and the JSON is never decoded) and 'd' (the JSON). ARGV: expected version
# ('' = no entry), new version, retention deadline (epoch ms), publish command, channel, message, and
# the JSON last. The publish is a pcall so a server without PUBLISH rights still saves.
_CAS = """
local current = redis.call('HGET', KEYS[1], 'v')
if current then
  if current ~= ARGV[1] then return 0 end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[7])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.pcall(ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# Conditional delete. ARGV: expected version ('' = any), publish command, channel, message.
_DELETE = """
local current = redis.call('HGET', KEYS[1], 'v')
if not current then return 0 end
if ARGV[1] ~= '' and current ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall(ARGV[2], ARGV[3], ARGV[4])
return 1
"""

# Take the lease, or re-take our own: an owner token whose acquire failed on the way back (a timeout,
# a cancellation) is re-used by the next acquire, so the lease it may have set is not orphaned.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Owner-checked renewal and release: a holder whose lease expired must not touch the next holder's.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: The Lua scripts by name, registered on every client that sends them.
SCRIPTS = {"cas": _CAS, "delete": _DELETE, "acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE}


def ms(seconds: float) -> int:
    """Whole milliseconds for PX / PEXPIRE, at least 1."""
    return max(1, int(seconds * 1000))


class KeyLayout:
    """The names one storage's keys and change messages have under its ``prefix``."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} must not contain '{{' or '}}' (they mark Cluster slots)")
        self.prefix = prefix
        #: The pub/sub channel every save and delete under the prefix publishes on.
        self.channel = f"{prefix}:changes"

    def entry_pattern(self) -> str:
        """The ``SCAN MATCH`` pattern of this prefix's entries, and of nothing else (the prefix's glob
        characters escaped, the digest 32 characters)."""
        escaped = "".join("\\" + char if char in "*?[]\\" else char for char in self.prefix)
        return f"{escaped}:{{{'?' * 32}}}:entry"

    def entry(self, key: EntryKey) -> str:
        """The entry's hash."""
        return self._slot(key) + ":entry"

    def lease(self, key: EntryKey) -> str:
        """The refresh lease's string."""
        return self._slot(key) + ":lease"

    def _slot(self, key: EntryKey) -> str:
        return f"{self.prefix}:{{{key.digest}}}"

    def cas_args(
        self, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None, retention: float, origin: str
    ) -> list[Any]:
        """The compare-and-set script's ARGV (ValueError for a version no store can hold)."""
        tokens = storable(tokens)
        deadline_ms = int(retention_deadline(tokens, time.time(), retention) * 1000)
        expected = "" if expected_version is None else str(expected_version)
        return [
            expected, str(tokens.version), deadline_ms, "PUBLISH", self.channel, _message(key, origin),
            blob(key, tokens),
        ]  # fmt: skip

    def delete_args(self, key: EntryKey, expected_version: int | None, origin: str) -> list[Any]:
        """The conditional delete script's ARGV."""
        expected = "" if expected_version is None else str(expected_version)
        return [expected, "PUBLISH", self.channel, _message(key, origin)]


def _message(key: EntryKey, origin: str) -> str:
    return f"{key.digest} {origin}"


def blob(key: EntryKey, tokens: UpstreamTokens) -> str:
    """The entry's JSON, with its ids inside, starting with blanks so SLOWLOG's copy of the argument
    (its first 128 bytes) holds no token."""
    data = tokens.to_dict()
    data["entry_key"] = [key.provider_id, key.session_id]
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return "{" + " " * _SLOWLOG_ARGUMENT + text[1:]


def entry_key_of(raw: Any) -> EntryKey | None:
    """The ids inside an entry's JSON, as its key; ``None`` for none (the entry vanished) or for JSON that
    does not hold them."""
    if raw is None:
        return None
    try:
        ids = json.loads(raw).get("entry_key")
    except (ValueError, AttributeError):
        return None
    if not (isinstance(ids, list) and len(ids) == 2 and all(isinstance(part, str) for part in ids)):
        return None
    return EntryKey(ids[0], ids[1])


def read_entry(key: EntryKey, raw: Any) -> UpstreamTokens | None:
    """The tokens in an entry's JSON (``None`` for none, or for another key's entry); ValueError or
    TypeError when it cannot be read."""
    if raw is None:
        return None
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("token entry is not a JSON object")
    ids = data.pop("entry_key", None)
    if ids is not None and ids != [key.provider_id, key.session_id]:
        # Two (provider, session) pairs with one 128-bit digest: never hand out another's tokens.
        return None
    return UpstreamTokens.from_dict(data)
