"""A client for the MCP conformance suite (npm ``@modelcontextprotocol/conformance``) that drives
``httpx_upstream_auth.mcp`` (SDK-login mode over ``connect``) through each client scenario.

The suite runs it as ``python tests/conformance/client.py <server URL>`` with ``MCP_CONFORMANCE_SCENARIO`` (and,
for some scenarios, ``MCP_CONFORMANCE_CONTEXT``) in the environment; it must exit 0 within 30 s. After a login
that produced a refresh token, it also makes our manager refresh once and calls the server again with the new
token (the suite's authorization server issues none today, so this is a no-op there; see docs/mcp.md).
Client-credentials scenarios log in through the SDK's own client-credentials providers (``sdk_provider``);
the rest through its interactive provider. Exits 3 for a scenario this module does not implement (enterprise
managed authorization).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import attrs
import httpx
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata

from httpx_upstream_auth import MemoryStorage, ReauthenticationRequired, UpstreamAuthError
from httpx_upstream_auth.mcp import SDKLogin, connect

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
logger = logging.getLogger("conformance-client")

REDIRECT_URI = "http://localhost:3000/callback"
CLIENT_METADATA_URL = "https://conformance-test.local/client-metadata.json"
SESSION = "conformance"
UNSUPPORTED = ("auth/cross-app-access", "auth/enterprise-")


class Browser:
    """Follows the authorization URL (the suite's server approves at once) and reads the code from the redirect."""

    def __init__(self) -> None:
        self.result: AuthorizationCodeResult | None = None

    async def redirect(self, url: str) -> None:
        """Open the authorization URL; keep the code, state and iss it redirects with."""
        async with httpx.AsyncClient() as client:
            response = await client.get(url, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in (301, 302, 303, 307, 308) or not location:
            raise RuntimeError(f"the authorization endpoint answered {response.status_code}, not a redirect")
        query = parse_qs(urlsplit(location).query)
        if "code" not in query:
            raise RuntimeError("no code in the redirect")
        self.result = AuthorizationCodeResult(
            code=query["code"][0], state=query.get("state", [None])[0], iss=query.get("iss", [None])[0]
        )

    async def callback(self) -> AuthorizationCodeResult:
        """Hand the code to the SDK."""
        if self.result is None:
            raise RuntimeError("the redirect handler was not called")
        result, self.result = self.result, None
        return result


async def accept_with_defaults(context: Any, params: Any) -> Any:
    """Accept an elicitation, answering each field with its schema default (SEP-1034)."""
    import mcp_types

    schema = getattr(params, "requested_schema", None) or {}
    content = {name: spec["default"] for name, spec in schema.get("properties", {}).items() if "default" in spec}
    return mcp_types.ElicitResult(action="accept", content=content)


async def run_tools(client: Any, scenario: str) -> None:
    """What each scenario's server expects the client to do once connected: list the tools, call the first (an
    auth scenario may refuse it: a step-up that keeps failing is logged, as the suite expects the client to stop)."""
    tools = await client.list_tools()
    names = [tool.name for tool in tools.tools]
    if scenario == "tools_call" and "add_numbers" in names:
        await client.call_tool("add_numbers", {"a": 5, "b": 3})
    elif scenario == "sse-retry" and "test_reconnection" in names:
        await client.call_tool("test_reconnection", {})
    elif scenario == "elicitation-sep1034-client-defaults" and "test_client_elicitation_defaults" in names:
        await client.call_tool("test_client_elicitation_defaults", {})
    elif names:
        try:
            await client.call_tool(names[0], {})
        except UpstreamAuthError as exc:
            logger.info("the call to %s failed: %s: %s", names[0], type(exc).__name__, exc)


def client_credentials(server_url: str, scenario: str, context: dict[str, Any]) -> Any:
    """For a client-credentials scenario, what builds the SDK's provider for it; else ``None``."""
    if scenario == "auth/client-credentials-basic":
        from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider

        return lambda storage: ClientCredentialsOAuthProvider(
            server_url, storage, context["client_id"], context["client_secret"], "client_secret_basic"
        )
    if scenario == "auth/client-credentials-jwt":
        from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider, SignedJWTParameters

        signing = SignedJWTParameters(
            issuer=context["client_id"],
            subject=context["client_id"],
            signing_algorithm=context.get("signing_algorithm", "ES256"),
            signing_key=context["private_key_pem"],
        )
        return lambda storage: PrivateKeyJWTOAuthProvider(
            server_url, storage, context["client_id"], signing.create_assertion_provider()
        )
    return None


async def main(server_url: str, scenario: str, context: dict[str, Any]) -> int:
    """Run ``scenario`` against ``server_url``; the exit status."""
    if scenario.startswith(UNSUPPORTED):
        logger.warning("scenario %s needs a grant this module does not implement", scenario)
        return 3
    browser = Browser()
    preregistered = None
    if context.get("client_id") and not scenario.startswith("auth/client-credentials-"):  # pre-registered
        secret = context.get("client_secret")
        preregistered = OAuthClientInformationFull(
            client_id=context["client_id"],
            client_secret=secret,
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
        )
    login = SDKLogin(
        server_url,
        sdk_provider=client_credentials(server_url, scenario, context),
        client_metadata=OAuthClientMetadata(
            client_name="httpx-upstream-auth-conformance",
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
        ),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=MemoryStorage(),
        client_metadata_url=CLIENT_METADATA_URL,
        client_information=preregistered,
    )
    try:
        async with connect(
            server_url, login, SESSION, mode="legacy", elicitation_callback=accept_with_defaults
        ) as client:
            await run_tools(client, scenario)
            try:
                tokens = await login.manager.aget_token(SESSION)
            except ReauthenticationRequired:
                tokens = None  # a server that asked for no authorization
            if tokens is not None and tokens.refresh_token is not None:  # drive our refresh, use the new token
                await login.manager.astore(SESSION, attrs.evolve(tokens, expires_at=time.time() - 1))
                await client.list_tools()
                logger.info("refreshed once through the discovered token endpoint")
            else:
                logger.info("no refresh token was issued: nothing to refresh")
    finally:
        await login.aclose()
    return 0


if __name__ == "__main__":
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    sys.exit(anyio.run(main, sys.argv[-1], scenario, context))
