"""The fault matrix (issue 15): every way a token endpoint misbehaves, over real HTTP against the LocalProvider,
with and without a ``reuse_grace``; docs/faults.md shows the same table and a test keeps the two equal.

For each fault the refresh of an expired entry either succeeds (a retry inside the job, or the grace's second
presentation), or fails with the documented typed error and leaves the stored entry exactly as it was (every
field, the version included; a second manager then refreshes it, proving the refresh token was not consumed),
or, when the provider may have consumed the refresh token and no grace covers it, removes the entry (fail
closed). In every case no refresh token is presented twice outside the grace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from support import SESSION, ManagerFactory, astored, expired

from httpx_upstream_auth import (
    ConfigurationError,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parent.parent / "docs" / "faults.md"
#: The grace the "with a grace" column uses, on the provider and the manager alike (Okta's default).
GRACE = 30.0
#: How long the refresher waits for an answer in these tests: a stall longer than this is a lost answer.
TIMEOUT = 0.5

REFRESHED = "refreshed"
REMOVED = "entry removed, ReauthenticationRequired"


def kept(error: type[Exception]) -> str:
    """The outcome "the typed error, stored tokens untouched"."""
    return f"{error.__name__}, entry untouched"


@dataclass(frozen=True)
class Fault:
    """One row: what the token endpoint does (``faults`` queued on the provider; ``path`` or ``refused`` for a
    wrong URL; ``connect_timeouts`` injected before sending), and the outcome without and with a grace."""

    name: str
    strict: str
    graced: str
    faults: tuple[str, ...] = ()
    path: str = "/token"
    refused: bool = False
    connect_timeouts: int = 0


FAULTS = [
    Fault("500 with an HTML page", REMOVED, REFRESHED, ("html:500",)),
    Fault("502 with an HTML page, after the provider redeemed", REMOVED, REFRESHED, ("redeem_then:502",)),
    Fault("503 with an HTML page", REMOVED, REFRESHED, ("html:503",)),
    Fault("503 `temporarily_unavailable` twice, then an answer", REFRESHED, REFRESHED, ("503", "503")),
    Fault("429 with `Retry-After: 1`", REFRESHED, REFRESHED, ("429",)),
    Fault("connect timeout (nothing sent)", REFRESHED, REFRESHED, connect_timeouts=1),
    Fault("connection refused", kept(RefreshFailed), kept(RefreshFailed), refused=True),
    Fault("10-second stall (timeout after sending)", REMOVED, REFRESHED, ("delay:10",)),
    Fault("answer lost after the provider redeemed", REMOVED, REFRESHED, ("answer_delay:10",)),
    Fault("200 with a body that is not JSON", REMOVED, REFRESHED, ("malformed",)),
    Fault("200 JSON without `access_token`", REMOVED, REFRESHED, ("no_access_token",)),
    Fault('200 with `token_type` "mac"', REFRESHED, REFRESHED, ("token_type:mac",)),
    Fault("200 with a 10 MB body", REMOVED, REMOVED, ("huge:10485760",)),
    Fault("307 redirect", kept(ConfigurationError), kept(ConfigurationError), ("redirect:307",)),
    Fault("401 `invalid_client`", kept(ConfigurationError), kept(ConfigurationError), ("invalid_client",)),
    Fault("404: a wrong token URL path", kept(ConfigurationError), kept(ConfigurationError), path="/oauth/token"),
]


class ConnectTimeouts(httpx.HTTPTransport):
    """A real HTTP transport whose first ``count`` requests fail to connect (a timeout before anything is sent:
    loopback cannot produce one)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.count > 0:
            self.count -= 1
            raise httpx.ConnectTimeout("connect timed out (injected)", request=request)
        return super().handle_request(request)


def table() -> str:
    """The matrix as docs/faults.md shows it."""
    rows = ["| fault | `reuse_grace=0` (the default) | `reuse_grace=30` |", "| --- | --- | --- |"]
    rows += [f"| {fault.name} | {fault.strict} | {fault.graced} |" for fault in FAULTS]
    return "\n".join(rows)


def test_the_docs_show_this_matrix() -> None:
    """docs/faults.md carries the table these tests check, row for row."""
    assert table() in DOC.read_text(), "docs/faults.md is out of date: paste table() from this module"


@pytest.mark.parametrize("graced", [False, True], ids=["strict", "grace"])
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, fault: Fault, graced: bool
) -> None:
    """One row of the matrix, one column."""
    grace = GRACE if graced else 0.0
    provider.reuse_grace = GRACE  # the provider would honour a second presentation: only the client decides
    base = token_url.removesuffix("/token")
    url = "http://127.0.0.1:9/token" if fault.refused else base + fault.path
    client = httpx.Client(transport=ConnectTimeouts(fault.connect_timeouts), timeout=TIMEOUT)
    storage = MemoryStorage()
    manager = make_manager(
        storage=storage,
        refresher=OAuth2Refresher(url, "test-client", "test-secret", timeout=TIMEOUT, client=client),
        reuse_grace=grace,
    )
    try:
        entry = await manager.astore(SESSION, expired(provider.login()))
        for kind in fault.faults:
            provider.fail_next(kind)
        outcome = await _refresh(manager, entry)
        assert outcome == (fault.graced if graced else fault.strict)
        after = await astored(manager)
        if outcome == REFRESHED:
            assert after is not None and after.version == entry.version + 1
            # A token type other than Bearer is kept and sent with its own scheme, never passed off as Bearer.
            scheme = next((k.partition(":")[2] for k in fault.faults if k.startswith("token_type:")), "Bearer")
            assert after.authorization.startswith(scheme + " ")
        elif outcome == REMOVED:
            assert after is None
        else:
            assert after == entry
            # The refresh token was not consumed: another manager refreshes it.
            other = make_manager(storage=storage)
            assert (await other.aget_token(SESSION)).version == entry.version + 1
        assert provider.stats["refresh_reuse"] == 0
    finally:
        await anyio.to_thread.run_sync(client.close)


async def _refresh(manager: TokenManager, entry: UpstreamTokens) -> str:
    """Refresh the expired entry; the matrix's name for what happened."""
    try:
        fresh = await manager.aget_token(SESSION)
    except ReauthenticationRequired:
        return REMOVED
    except (ConfigurationError, RefreshFailed) as exc:
        return kept(type(exc))
    assert fresh.version == entry.version + 1
    return REFRESHED
