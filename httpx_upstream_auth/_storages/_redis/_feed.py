"""How a Redis storage hears every save and delete: one pub/sub connection per storage, read by a thread.

The compare-and-set and delete scripts publish ``<digest> <origin>`` on the prefix's change channel;
the :class:`Subscriber` passes each message to its :class:`ChangeHub`, which wakes the watchers of that
entry and calls the storage's subscribers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any

from ..._changes import ChangeHub

__all__ = ["Subscriber"]

#: Seconds of silence after which the pub/sub connection is pinged, to find a half-open connection.
_HEALTH_CHECK = 5.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _kind(message: dict[str, Any]) -> str:
    return _text(message.get("type"))


class Subscriber:
    """One pub/sub connection per storage, on the prefix's change channel, for every watcher and subscriber.

    A thread reads it and publishes each ``<digest> <origin>`` message to the hub. After a lost
    connection it reconnects with back-off and reports ``None`` (anything may have changed meanwhile);
    while it is down, or when the server refuses pub/sub, watchers fall back to polling.
    """

    def __init__(
        self,
        owner: weakref.ref[Any],
        client: Any,
        channel: str,
        *,
        timeout: float,
        refusal: type[BaseException],
        missed: bool = False,
    ) -> None:
        self.hub = ChangeHub()
        # True in a forked child: its subscribers heard the parent's listener until the fork, and
        # whatever was published before this one subscribes is lost, so its first subscription says None.
        self._missed = missed
        self._storage = owner  # the thread ends once the storage is gone
        self._client = client
        self._channel = channel
        self._timeout = timeout
        self._errors: tuple[type[BaseException], ...] = (refusal,)
        self._state = "starting"  # then "live", "down" (reconnecting) or "refused" (no pub/sub)
        self.pid = os.getpid()  # a forked child has no thread: it needs a listener of its own
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def live(self) -> bool:
        """True while messages arrive (watchers may then rely on them)."""
        return self._state == "live"

    @property
    def refused(self) -> bool:
        """True when the server refused pub/sub (an ACL): changes cannot be pushed."""
        return self._state == "refused"

    def ensure(self) -> None:
        """Start the thread if needed and wait (within the socket timeout) for its first subscription."""
        with self._changed:
            self._start()
            self._changed.wait_for(lambda: self._state != "starting", timeout=self._timeout + 0.5)

    def start(self) -> None:
        """Start the thread if needed, without waiting for it."""
        with self._changed:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="httpx-upstream-auth-redis-changes", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its connection (within a fraction of a second)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def _set_state(self, state: str) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def _run(self) -> None:
        announce = self._missed  # after the first connection, a (re)connection may have missed messages
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # the object only: it connects at the subscribe below
            try:
                pubsub.subscribe(self._channel)
                deadline = time.monotonic() + self._timeout
                while True:
                    message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                    if message is not None and _kind(message) == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise TimeoutError("no confirmation of SUBSCRIBE")
                self._set_state("live")
                if announce:
                    self.hub.publish(None, None)
                announce, backoff = True, 0.05
                heard, pinged = time.monotonic(), 0.0
                while not self._stop.is_set() and self._storage() is not None:
                    message = pubsub.get_message(timeout=0.2)
                    now = time.monotonic()
                    if message is not None:
                        heard, pinged = now, 0.0
                        if _kind(message) == "message":
                            digest, _, origin = _text(message.get("data")).partition(" ")
                            self.hub.publish(digest or None, origin or None)
                    elif not pinged and now - heard > _HEALTH_CHECK:
                        # A silent connection may be half-open (the host vanished without a FIN): it
                        # would look live forever while every message is lost. Ask, and expect a pong.
                        pubsub.ping()
                        pinged = now
                    elif pinged and now - pinged > self._timeout:
                        raise TimeoutError("no answer to PING on the pub/sub connection")
            except self._errors:
                self._set_state("refused")
                self.hub.wake(None)
                return
            except Exception:  # after stop() too: the loop then ends, its watchers woken to find the store closed
                self._set_state("down")
                self.hub.wake(None)  # watchers switch to polling
                announce = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
            if self._storage() is None:
                return
