"""What the command line is configured with: flags, ``HTTPX_UPSTREAM_AUTH_*`` variables and a TOML file.

Each setting is looked up in that order (a flag wins over the environment, which wins over the file);
the file names providers (token URL or discovery URL, client id, auth method, where the client secret
is). A client secret is read from an environment variable or a file, never from the command line.
Every problem is a :class:`UsageError` with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx

from ._exceptions import ConfigurationError, RefreshFailed
from ._oauth import AUTH_METHODS, SECRET_AUTH_METHODS, RefreshRequest, check_token_url
from ._sync._http import send_refresh_request

__all__ = [
    "ENV_PREFIX",
    "CliConfig",
    "ProviderSettings",
    "UsageError",
    "load_config",
    "user_config_dir",
    "user_data_dir",
]

ENV_PREFIX = "HTTPX_UPSTREAM_AUTH_"
APP_DIR = "httpx-upstream-auth"
#: The keys a ``[providers.NAME]`` table may have (anything else is a typo worth an error).
PROVIDER_KEYS = (
    "token_url",
    "discovery_url",
    "client_id",
    "auth_method",
    "client_secret_env",
    "client_secret_file",
    "scope",
)
TOP_KEYS = ("store", "default_provider", "encryption_keys_env", "encryption_keys_file", "providers")
MAX_METADATA_BYTES = 64 * 1024
#: The most the CLI reads of a configuration, key, secret or answer file (or stdin): more is not one of those.
MAX_INPUT_BYTES = 1024 * 1024


class UsageError(Exception):
    """A command line, configuration or input the CLI cannot use; its text is the one line to print."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error raised as :class:`UsageError` (one line on stderr, status 2), not
    printed as the usage and a second line."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error."""
        raise UsageError(f"{message} (see {self.prog} --help)")


def user_data_dir(platform: str = sys.platform, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the default token store lives: ``$XDG_DATA_HOME`` (else ``~/.local/share``) on Linux and
    other Unixes, ``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows; then
    ``httpx-upstream-auth``."""
    if platform == "win32":
        base = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif platform == "darwin":
        base = str(Path.home() / "Library" / "Application Support")
    else:
        xdg = environ.get("XDG_DATA_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".local" / "share")
    return Path(base) / APP_DIR


def user_config_dir(platform: str = sys.platform, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the default configuration file lives: ``$XDG_CONFIG_HOME`` (else ``~/.config``),
    ``~/Library/Application Support`` on macOS, ``%APPDATA%`` on Windows; then ``httpx-upstream-auth``."""
    if platform == "win32":
        base = environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
    elif platform == "darwin":
        base = str(Path.home() / "Library" / "Application Support")
    else:
        xdg = environ.get("XDG_CONFIG_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".config")
    return Path(base) / APP_DIR


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the tests run on 3.11+, where tomllib is in the standard library
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(
                f"reading the configuration file {path} needs Python 3.11 or later, or `pip install tomli`"
            ) from None
    data = read_small(path, "the configuration file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"the configuration file {path} is not UTF-8 text") from None
    except RecursionError:
        raise UsageError(f"the configuration file {path} is nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"the configuration file {path} is not valid TOML ({exc})") from None


@attrs.frozen
class ProviderSettings:
    """One provider's refresh settings, as the flags, environment and file give them."""

    name: str
    token_url: str | None = None
    discovery_url: str | None = None
    client_id: str | None = None
    auth_method: str = "client_secret_basic"
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scope: str | None = None

    def client_secret(self, environ: Mapping[str, str]) -> str | None:
        """The client secret (``None`` for ``auth_method = "none"``): from the variable ``client_secret_env``
        names, the file ``client_secret_file`` names, or ``HTTPX_UPSTREAM_AUTH_CLIENT_SECRET``."""
        if self.auth_method == "none":
            return None
        if self.client_secret_env is not None:
            if not _ENV_NAME.fullmatch(self.client_secret_env):
                # Not a variable's name: perhaps the secret itself, pasted in the wrong place.
                raise UsageError(
                    f"client_secret_env of provider {self.name!r} must name an environment variable (letters, digits "
                    "and _), not hold the secret itself"
                )
            value = environ.get(self.client_secret_env)
            if not value:
                # The name is not repeated: a secret pasted in its place would be.
                raise UsageError(
                    f"the client secret is missing: the environment variable client_secret_env of provider "
                    f"{self.name!r} names is not set"
                )
            return value
        if self.client_secret_file is not None:
            data = read_small(Path(self.client_secret_file), "the client secret file")
            value = data.decode("utf-8", "replace").strip()
            if not value:
                raise UsageError(f"the client secret is missing: {self.client_secret_file} is empty")
            return value
        value = environ.get(ENV_PREFIX + "CLIENT_SECRET")
        if not value:
            raise UsageError(
                f"the client secret of provider {self.name!r} is missing: set {ENV_PREFIX}CLIENT_SECRET, or "
                "client_secret_env / client_secret_file (never the secret itself on the command line)"
            )
        return value

    def resolve_token_url(self, timeout: float = 10.0) -> str:
        """The token endpoint: ``token_url``, else the ``token_endpoint`` of the discovery document.

        Raises :class:`UsageError` when neither is set, :class:`ConfigurationError` for a discovery
        document that names no usable endpoint, :class:`RefreshFailed` (retryable) when it could not be
        fetched now.
        """
        if self.token_url is not None:
            return self.token_url
        if self.discovery_url is None:
            raise UsageError(
                f"provider {self.name!r} has no token_url or discovery_url: set one in the configuration file, "
                f"with --token-url / --discovery-url, or {ENV_PREFIX}TOKEN_URL / {ENV_PREFIX}DISCOVERY_URL"
            )
        try:
            check_token_url(self.discovery_url)
        except ValueError as exc:
            raise UsageError(str(exc).replace("token_url", "discovery_url")) from None
        issuer = discovery_issuer(self.discovery_url)
        if issuer is None:
            raise UsageError(
                f"discovery_url of provider {self.name!r} must be the issuer's /.well-known/openid-configuration or "
                "/.well-known/oauth-authorization-server URL (the issuer the document must name is read from it)"
            )
        status_code, body = self._fetch_discovery(timeout)
        if status_code >= 500 or status_code == 429:
            raise RefreshFailed(
                f"the discovery document of provider {self.name!r} answered HTTP {status_code}; retry later",
                retryable=True,
                status_code=status_code,
            )
        document = _document(status_code, body)
        endpoint = document.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise ConfigurationError(
                f"the discovery URL of provider {self.name!r} answered HTTP {status_code} without a "
                "token_endpoint; check discovery_url (the issuer's /.well-known/openid-configuration)",
                setting="token_url",
                status_code=status_code,
            )
        named = document.get("issuer")
        if not isinstance(named, str) or named.rstrip("/") != issuer.rstrip("/"):
            # RFC 8414 section 3.3, OpenID Discovery 4.3: else any document could send the refresh token and the
            # client secret to a token_endpoint of its choice. The named issuer is quoted escaped and cut short.
            shown = repr(named[:100]) if isinstance(named, str) else "none"
            raise ConfigurationError(
                f"the discovery document of provider {self.name!r} names the issuer {shown}, not {issuer!r} (the "
                "issuer of its discovery_url; RFC 8414 section 3.3): its token_endpoint is not used",
                setting="discovery_url",
            )
        return endpoint

    def _fetch_discovery(self, timeout: float) -> tuple[int, bytes]:
        """GET the discovery document through the token endpoint's exchange: at most MAX_METADATA_BYTES, all of it
        within ``timeout`` seconds (httpx's timeouts bound each read only), never following a redirect."""
        assert self.discovery_url is not None
        request = RefreshRequest(self.discovery_url, {"accept": "application/json"}, "", method="GET")
        try:
            with httpx.Client(timeout=timeout) as client:
                answer = send_refresh_request(client, request, MAX_METADATA_BYTES, timeout)
        except RefreshFailed as exc:
            if exc.retryable:
                raise RefreshFailed(
                    f"could not fetch the discovery document of provider {self.name!r} (unreachable, or not complete "
                    f"within {timeout:g} s); retry later",
                    retryable=True,
                ) from None
            raise ConfigurationError(
                f"the discovery document of provider {self.name!r} could not be read (larger than "
                f"{MAX_METADATA_BYTES // 1024} KiB, or its host cannot be reached as configured); check discovery_url",
                setting="discovery_url",
            ) from None
        return answer.status_code, answer.body


def discovery_issuer(url: str) -> str | None:
    """The issuer a discovery URL was formed from: ``ISSUER/.well-known/openid-configuration`` (OpenID
    Discovery), or ``https://host/.well-known/oauth-authorization-server/PATH`` (RFC 8414, issuer
    ``https://host/PATH``); ``None`` for any other URL."""
    parts = urlsplit(url)
    for suffix in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        if parts.path.endswith(suffix):
            path = parts.path[: -len(suffix)]
        elif parts.path.startswith(suffix + "/"):
            path = parts.path[len(suffix) :]
        else:
            continue
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return None


def _document(status_code: int, body: bytes) -> dict[str, Any]:
    """The discovery document's JSON object (empty when the answer is not a 200 JSON object)."""
    if status_code != 200:
        return {}
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}


@attrs.frozen
class CliConfig:
    """Everything the commands need to know: the store URL, the provider, and where they came from."""

    store: str
    provider: str | None
    settings: ProviderSettings | None
    config_path: Path | None
    encryption_keys: tuple[str, ...] = ()
    """The store's encryption keys, newest first, each ``[KEY_ID:]BASE64`` (none: the store is not encrypted)."""
    keys_origin: str = ""
    """Where the keys came from, for messages (never the keys)."""

    def require_provider(self) -> str:
        """The provider id the command acts on; UsageError when none was chosen."""
        if self.provider is None:
            raise UsageError(
                f"no provider chosen: pass --provider NAME, set {ENV_PREFIX}PROVIDER, or set default_provider "
                "in the configuration file"
            )
        return self.provider


def quoted_short(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, cut to about ``limit`` characters (a pasted blob is not echoed whole)."""
    quoted = repr(text if len(text) <= limit else text[:limit])
    return quoted if len(text) <= limit else f"{quoted}... ({len(text)} characters)"


def _layer(flag: Any, environ: Mapping[str, str], name: str, table: Mapping[str, Any], key: str) -> Any:
    """A flag, else ``HTTPX_UPSTREAM_AUTH_<name>``, else the file's value (``None`` when none is set)."""
    if flag is not None:
        return flag
    if environ.get(ENV_PREFIX + name):
        return environ[ENV_PREFIX + name]
    return table.get(key)


def _check_table(table: dict[str, Any], where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UsageError(f"{where} has unknown keys {', '.join(unknown)}; known: {', '.join(allowed)}")
    for key, value in table.items():
        if key != "providers" and not isinstance(value, str):
            raise UsageError(f"{where}: {key} must be a string")
    return table


def _present(path: Path) -> bool:
    """Whether the default configuration file is there to read (one that cannot be looked at is an error)."""
    try:
        return path.is_file()
    except OSError as exc:  # is_file is False for a missing file, but raises for a name too long, a denied directory
        raise UsageError(f"cannot read the configuration file {path} ({exc.strerror})") from None


def load_config(flags: Any, environ: Mapping[str, str] = os.environ) -> CliConfig:
    """The configuration from ``flags`` (the parsed command line), ``environ`` and the TOML file
    (``--config``, else ``HTTPX_UPSTREAM_AUTH_CONFIG``, else ``config.toml`` in :func:`user_config_dir`
    when it exists)."""
    if getattr(flags, "config", None) == "":  # `--config "$FILE"` with FILE unset: not "the default file"
        raise UsageError("--config is empty (an unset variable?): pass the configuration file's path")
    explicit = getattr(flags, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    path = Path(explicit).expanduser() if explicit else user_config_dir(environ=environ) / "config.toml"
    document = _read_toml(path) if explicit or _present(path) else {}
    top = _check_table(document, f"the configuration file {path}", TOP_KEYS)
    providers = top.get("providers", {})
    if not isinstance(providers, dict) or not all(isinstance(value, dict) for value in providers.values()):
        raise UsageError(f"the configuration file {path}: providers must hold one table per provider")
    store = _layer(getattr(flags, "store", None), environ, "STORE", top, "store")
    if store is None:
        store = "sqlite:///" + str(user_data_dir(environ=environ) / "tokens.db")
    provider = _layer(getattr(flags, "provider", None), environ, "PROVIDER", top, "default_provider")
    if provider is None and len(providers) == 1:
        provider = next(iter(providers))
    if provider == "":
        # An empty id would be stored and listed as a provider of its own: most often an unset variable.
        raise UsageError(
            f"the provider is empty (an unset variable?): pass --provider NAME, set {ENV_PREFIX}PROVIDER or "
            "default_provider"
        )
    if provider is not None and providers and provider not in providers:  # a typo must not read as "log in again"
        known = ", ".join(sorted(providers))
        raise UsageError(
            f"unknown provider {quoted_short(provider)} (known: {known}): check --provider, or add it to {path}"
        )
    settings = None
    if provider is not None:
        table = _check_table(providers.get(provider, {}), f"[providers.{provider}] in {path}", PROVIDER_KEYS)
        values = {
            key: _layer(getattr(flags, key, None), environ, key.upper(), table, key)
            for key in PROVIDER_KEYS
            if key != "scope"
        }
        values["scope"] = table.get("scope")
        secret_file = values["client_secret_file"]
        if (
            secret_file is not None
            and getattr(flags, "client_secret_file", None) is None
            and table.get("client_secret_file") == secret_file
        ):
            # A relative path in the file is relative to the file, wherever the command runs.
            values["client_secret_file"] = str(path.parent / Path(secret_file).expanduser())
        if values["auth_method"] is None:
            values["auth_method"] = "client_secret_basic"
        if values["auth_method"] not in SECRET_AUTH_METHODS:
            # A method's name is repeated, anything else is not: it may be a secret pasted in the wrong place.
            given = f", not {values['auth_method']!r}" if values["auth_method"] in AUTH_METHODS else ""
            raise UsageError(
                f"auth_method of provider {provider!r} must be one of {', '.join(SECRET_AUTH_METHODS)}{given}"
            )
        settings = ProviderSettings(name=provider, **values)
    keys, origin = _encryption_keys(top, path, environ)
    return CliConfig(
        store=store,
        provider=provider,
        settings=settings,
        config_path=path if document else None,
        encryption_keys=keys,
        keys_origin=origin,
    )


def _encryption_keys(top: Mapping[str, Any], path: Path, environ: Mapping[str, str]) -> tuple[tuple[str, ...], str]:
    """The encryption keys' texts and where they came from: ``HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS``, else the
    variable ``encryption_keys_env`` names, else the file ``encryption_keys_file`` names (relative to the
    configuration file); a command-line flag never carries them."""
    if environ.get(ENV_PREFIX + "ENCRYPTION_KEYS"):
        origin = ENV_PREFIX + "ENCRYPTION_KEYS"
        text = environ[origin]
    elif top.get("encryption_keys_env") is not None:
        name = top["encryption_keys_env"]
        if not _ENV_NAME.fullmatch(name):
            raise UsageError("encryption_keys_env must name an environment variable (not hold the keys themselves)")
        origin = "the environment variable encryption_keys_env names"
        text = environ.get(name, "")
        if not text:
            raise UsageError(f"the encryption keys are missing: {origin} is not set")
    elif top.get("encryption_keys_file") is not None:
        file = path.parent / Path(top["encryption_keys_file"]).expanduser()
        origin = f"{file} (encryption_keys_file)"
        text = read_small(file, "the encryption keys file").decode("utf-8", "replace")
    else:
        return (), ""
    keys = tuple(text.replace(",", " ").split())
    if not keys:
        raise UsageError(f"the encryption keys are missing: {origin} is empty")
    return keys, origin


#: What an environment variable's name looks like (a value that does not is a secret pasted in the wrong place).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def read_small(path: Path, what: str) -> bytes:
    """The bytes of the regular file ``path`` (at most :data:`MAX_INPUT_BYTES`); :class:`UsageError` for a
    FIFO, a device or a directory (which could block, or never end), or a larger file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path} ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{what} {path} is larger than {MAX_INPUT_BYTES // 1024} KiB")
    return data
