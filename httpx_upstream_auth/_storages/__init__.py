"""Where token entries live: the storage contract and its backends.

``_base.py`` holds the contract (the ``Storage`` ABC, ``Lease``) and the helpers every backend uses;
``_shared.py`` what the stores shared between processes do alike; ``_memory.py``, ``_sqlite.py`` and
``_redis/`` the backends; ``_encrypted.py`` the wrapper that encrypts any of them at rest; ``_registry.py``
opens one by URL.
"""

from ._base import ChangeCallback, Lease, Storage
from ._encrypted import EncryptedStorage, EncryptionKey, Reencrypted
from ._memory import MemoryStorage
from ._redis import RedisStorage
from ._registry import open_storage, register_storage
from ._sqlite import SQLiteStorage

__all__ = [
    "ChangeCallback",
    "EncryptedStorage",
    "EncryptionKey",
    "Lease",
    "MemoryStorage",
    "RedisStorage",
    "Reencrypted",
    "SQLiteStorage",
    "Storage",
    "open_storage",
    "register_storage",
]
