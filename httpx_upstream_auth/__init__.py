"""httpx-upstream-auth: upstream OAuth token expiry made invisible to code that calls APIs with httpx.

    manager = TokenManager(refresher=OAuth2Refresher(...), provider_id="github", storage=MemoryStorage())
    manager.store("session-1", UpstreamTokens(...))
    httpx.Client(auth=manager.auth("session-1"))

Every public name is importable from here; implementation lives in private modules.
"""

import logging

from ._async._transport import AsyncUpstreamAuthTransport
from ._auth import UpstreamAuth
from ._clock import Clock, SystemClock
from ._dpop import DPoP, DPoPKey
from ._exceptions import (
    BindingMismatch,
    ConfigurationError,
    EntryRefused,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    UpstreamAuthError,
)
from ._jose import ClientAssertion
from ._logout import Logout
from ._manager import TokenManager
from ._models import Binding, EntryKey, UpstreamTokens
from ._policy import FreshnessBounds, FreshnessPolicy, can_replay, is_token_rejected
from ._refresher import OAuth2Refresher, Refresher
from ._storages import (
    EncryptedStorage,
    EncryptionKey,
    Lease,
    MemoryStorage,
    RedisStorage,
    Reencrypted,
    SQLiteStorage,
    Storage,
    open_storage,
    register_storage,
)
from ._sync._transport import UpstreamAuthTransport
from ._trace import TraceEvent

__version__ = "0.1.0"

__all__ = [
    "AsyncUpstreamAuthTransport",
    "Binding",
    "BindingMismatch",
    "ClientAssertion",
    "Clock",
    "ConfigurationError",
    "DPoP",
    "DPoPKey",
    "EncryptedStorage",
    "EncryptionKey",
    "EntryKey",
    "EntryRefused",
    "FreshnessBounds",
    "FreshnessPolicy",
    "Lease",
    "Logout",
    "MemoryStorage",
    "OAuth2Refresher",
    "ReauthenticationRequired",
    "RedisStorage",
    "Reencrypted",
    "RefreshFailed",
    "Refresher",
    "SQLiteStorage",
    "Storage",
    "StorageError",
    "SystemClock",
    "TokenManager",
    "TraceEvent",
    "UpstreamAuth",
    "UpstreamAuthError",
    "UpstreamAuthTransport",
    "UpstreamTokens",
    "can_replay",
    "is_token_rejected",
    "open_storage",
    "register_storage",
]

# As the logging HOWTO asks of libraries: no output of our own unless the application configures logging (without
# a handler, Python's last-resort one would print every warning on stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())
