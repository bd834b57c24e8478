# Generated from _async by tests/unasync_twins.py: do not edit.
"""Send one token request and read its answer, capped in size, with every failure typed.

Failures are built where they happen but raised from :func:`send_refresh_request`, outside any
``except`` block: the httpx error is dropped, not chained, because its traceback's frames hold the
request body and whatever part of the answer had arrived, and error reporters record frame locals.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from contextlib import closing
from typing import cast

import httpx

from .._exceptions import RefreshFailed
from .._oauth import RefreshRequest, TokenAnswer, oversize_failure, retry_after_seconds, slow_failure, transport_failure


def send_refresh_request(
    client: httpx.Client, request: RefreshRequest, max_bytes: int, total_timeout: float
) -> TokenAnswer:
    """POST the request, never following a redirect; return the answer or raise :class:`RefreshFailed`.

    The answer must be complete within ``total_timeout`` seconds: httpx's timeouts bound each read, and
    an endpoint trickling its answer would otherwise hold the refresh (and its lease) without end.
    """
    outcome = _exchange(client, request, max_bytes, time.monotonic() + total_timeout, total_timeout)
    if isinstance(outcome, RefreshFailed):
        raise outcome from None
    return outcome


def _exchange(
    client: httpx.Client, request: RefreshRequest, max_bytes: int, deadline: float, total_timeout: float
) -> TokenAnswer | RefreshFailed:
    status_code: int | None = None
    outcome: TokenAnswer | RefreshFailed | None = None
    try:
        # follow_redirects=False whatever the client says: a redirect would carry the secrets to another URL.
        with client.stream(
            request.method, request.url, headers=request.headers, content=request.body, follow_redirects=False
        ) as response:
            status_code = response.status_code
            body = bytearray()
            # Closed here when the read stops early, not left to the garbage collector (trio warns then);
            # httpx types it as an iterator, but it is a generator.
            with closing(cast(Generator[bytes, None], response.iter_bytes())) as chunks:
                for chunk in chunks:
                    body += chunk
                    if len(body) > max_bytes:
                        outcome = oversize_failure(status_code, max_bytes)
                        break
                    if time.monotonic() > deadline:
                        outcome = slow_failure(status_code, total_timeout)
                        break
                else:
                    retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
                    nonce = response.headers.get("dpop-nonce")
                    outcome = TokenAnswer(status_code, bytes(body), retry_after, nonce)
    except Exception as exc:  # any failure of the exchange is a RefreshFailed; see transport_failure
        if outcome is None:
            return transport_failure(exc, status_code)
        # The whole answer was read: failing to close the connection afterwards loses nothing.
    assert outcome is not None
    return outcome
