# Generated from _async by tests/unasync_twins.py: do not edit.
"""Send one token request and read its answer, capped in size, with transport errors typed."""

from __future__ import annotations

import httpx

from .._exceptions import RefreshFailed
from .._oauth import RefreshRequest


def send_refresh_request(
    client: httpx.Client, request: RefreshRequest, max_bytes: int
) -> tuple[int, bytes]:
    """POST the request; return the status and body. Raise :class:`RefreshFailed` on transport errors."""
    try:
        with client.stream("POST", request.url, headers=request.headers, content=request.body) as rsp:
            body = bytearray()
            for chunk in rsp.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise RefreshFailed(
                        f"the token endpoint's answer exceeded {max_bytes} bytes and was dropped; stored "
                        "tokens are unchanged. Check token_url.",
                        retryable=False,
                        status_code=rsp.status_code,
                    )
            return rsp.status_code, bytes(body)
    except httpx.TimeoutException:
        raise RefreshFailed(
            "the token endpoint did not answer in time; stored tokens are unchanged. Retry later.",
            retryable=True,
        ) from None
    except httpx.HTTPError as exc:
        raise RefreshFailed(
            f"could not reach the token endpoint ({type(exc).__name__}); stored tokens are unchanged. "
            "Retry later.",
            retryable=True,
        ) from None
