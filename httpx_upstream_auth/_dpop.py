"""DPoP (RFC 9449): the key a session's tokens are bound to, the proofs signed with it, and server nonces.

``DPoP`` is the configuration a refresher carries (``OAuth2Refresher(dpop=DPoP())``); the auth flow and
the refresher ask it for proofs. Keys are per session by default: each entry carries its private key
(``UpstreamTokens.dpop_key``, a JWK), so every process and host that refreshes the session, or calls an
API with it, proves possession of the same key. With ``DPoP(key=...)`` one key serves every session
(per client) and entries carry none.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ._exceptions import ConfigurationError, ReauthenticationRequired
from ._jose import ASYMMETRIC_ALGS, default_alg, load_jwt, load_private_key
from ._models import UpstreamTokens
from ._policy import carried
from ._synchronization import ForkRegistry

__all__ = [
    "DPoP",
    "DPoPKey",
    "access_token_hash",
    "is_nonce_challenge",
    "is_proof_refused",
    "jwk_thumbprint",
    "origin_of",
]

#: JWK members that make a key's RFC 7638 thumbprint, by key type.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
logger = logging.getLogger("httpx_upstream_auth")

#: Parsed per-session keys kept per DPoP configuration (parsing a JWK costs more than signing with it).
KEY_CACHE_SIZE = 1024
#: Keys made for entries that had none, kept by refresh token (its hash) until the refresh is saved.
NEW_KEYS_SIZE = 64


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url): what a token's ``cnf.jkt`` names."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError(f"unsupported JWK key type {jwk.get('kty')!r}")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def access_token_hash(access_token: str) -> str:
    """The ``ath`` claim: base64url of the SHA-256 of the access token's ASCII bytes (RFC 9449 section 4.2)."""
    return _b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def _authority(parts: urllib.parse.SplitResult) -> str:
    """``host[:port]`` of a URL, lowercased, without its userinfo (which never leaves the client)."""
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    port = parts.port
    return host if port is None else f"{host}:{port}"


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lowercased and without userinfo: where a server nonce belongs."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme.lower()}://{_authority(parts)}"


def _target(url: str) -> str:
    """The ``htu`` claim: the URL without its userinfo, query and fragment (RFC 9449 section 4.2)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, _authority(parts), parts.path, "", ""))


class DPoPKey:
    """A DPoP key pair: it signs proofs; its public half goes in each proof's header.

    Make one with :meth:`generate`, or load one with :meth:`load` (PEM or JWK). :meth:`to_jwk` is the
    private JWK a stored entry carries (``UpstreamTokens(dpop_key=key.to_jwk())``); :attr:`thumbprint` is
    what the provider binds tokens to. The private key never appears in ``repr``.
    """

    __slots__ = ("_private", "_public_jwk", "alg", "thumbprint")

    def __init__(self, private_key: Any, alg: str) -> None:
        if alg not in ASYMMETRIC_ALGS:
            raise ValueError(
                f"a DPoP key signs with an asymmetric alg ({', '.join(sorted(ASYMMETRIC_ALGS))}), not {alg!r}"
            )
        algorithm = load_jwt().get_algorithm_by_name(alg)
        self._private = private_key
        self.alg = alg
        """The JWS algorithm of its proofs."""
        try:
            self._public_jwk: dict[str, Any] = algorithm.to_jwk(private_key.public_key(), as_dict=True)
            self.proof("GET", "https://check.invalid/", now=1_700_000_000.0)
        except Exception as exc:  # PyJWT's errors for a key that does not fit the algorithm vary by key type
            raise ValueError(f"the key cannot sign {alg} ({type(exc).__name__}); check alg and the key") from None
        self.thumbprint = jwk_thumbprint(self._public_jwk)
        """The RFC 7638 thumbprint of the public key (``jkt``)."""

    @classmethod
    def generate(cls, alg: str = "ES256") -> DPoPKey:
        """A new key pair for ``alg``: P-256/384/521 for ES256/384/512, RSA 2048 for RS*/PS*, Ed25519 for EdDSA."""
        load_jwt()  # a missing extra is an ImportError that names it
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        private: Any
        if alg.startswith("ES"):
            curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
            if alg not in curves:
                raise ValueError(f"unsupported DPoP alg {alg!r}")
            private = ec.generate_private_key(curves[alg])
        elif alg in ASYMMETRIC_ALGS and alg[:2] in ("RS", "PS"):
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported DPoP alg {alg!r}")
        return cls(private, alg)

    @classmethod
    def load(cls, key: str | bytes | Mapping[str, Any], alg: str | None = None) -> DPoPKey:
        """A key pair from a private key as PEM (text or bytes) or a JWK (a dict or its JSON text); ``alg``
        defaults to the JWK's ``alg``, else to the key's usual one. ``ValueError`` for anything else."""
        private, named_alg, _ = load_private_key(key)
        return cls(private, alg or named_alg or default_alg(private))

    def to_jwk(self) -> str:
        """The private key as JWK JSON, with its ``alg``: the form a stored entry carries (a secret)."""
        members: dict[str, Any] = load_jwt().get_algorithm_by_name(self.alg).to_jwk(self._private, as_dict=True)
        members["alg"] = self.alg
        return json.dumps(members, separators=(",", ":"), sort_keys=True)

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        """A DPoP proof JWT for one request: ``htm`` (``method``), ``htu`` (``url`` without its query and
        fragment), ``iat`` (``now``, default the system clock), a fresh ``jti``, ``ath`` when the request
        carries ``access_token``, and the server's ``nonce`` when it asked for one."""
        claims: dict[str, Any] = {
            "htm": method.upper(),
            "htu": _target(url),
            "iat": int(time.time() if now is None else now),
            "jti": secrets.token_urlsafe(18),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        headers = {"typ": "dpop+jwt", "jwk": self._public_jwk}
        token: str = load_jwt().encode(claims, self._private, algorithm=self.alg, headers=headers)
        return token

    def __repr__(self) -> str:
        return f"DPoPKey(alg={self.alg!r}, thumbprint={self.thumbprint!r})"


def is_nonce_challenge(status_code: int, headers: Any, body: bytes | None = None) -> bool:
    """True when an answer asks for a DPoP nonce: a token endpoint's 400 with ``error`` ``use_dpop_nonce``
    (``body``), or a resource server's 401 whose ``WWW-Authenticate`` says ``error="use_dpop_nonce"``."""
    if status_code == 401:
        challenges = headers.get_list("www-authenticate") if hasattr(headers, "get_list") else []
        return any("use_dpop_nonce" in challenge for challenge in challenges)
    if status_code == 400 and body is not None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(data, dict) and data.get("error") == "use_dpop_nonce"
    return False


def is_proof_refused(response: Any) -> bool:
    """True when a resource server's answer refuses the DPoP proof: a 401 whose ``WWW-Authenticate`` says
    ``error="invalid_dpop_proof"`` (no verdict on the token: a new one would go with the same kind of proof)."""
    if response.status_code != 401:
        return False
    return any("invalid_dpop_proof" in challenge for challenge in response.headers.get_list("www-authenticate"))


def _answered(response: Any, request: Any) -> Any:
    """The request ``response`` answers: ``request``, or the last hop of a redirect the client followed."""
    try:
        answered: Any = response.request
    except RuntimeError:  # a response built without a request
        return request
    return answered


class DPoP:
    """DPoP (RFC 9449) for a refresher's token requests and for the API requests of its manager's auth flows.

    Pass it as ``OAuth2Refresher(..., dpop=DPoP())``. Every token request then carries a ``DPoP`` proof, and
    tokens the provider answers with ``token_type`` ``"DPoP"`` are sent as ``Authorization: DPoP <token>``
    with a proof bound to the request (``htm``, ``htu``, ``ath``). Tokens answered as ``Bearer`` are sent as
    before, without a proof.

    ``key=None`` (the default): one key per session, carried by the stored entry (``UpstreamTokens.dpop_key``)
    so every process and host sharing the session signs with the same key; an entry without one gets a new
    ``alg`` key at its next refresh, saved with the refreshed entry. ``key=DPoPKey...``: that key for every
    session (per client); entries carry none.

    Server nonces (``DPoP-Nonce``) are remembered per origin and role (token endpoint or resource server), at
    most ``max_nonces`` of them (the least recently used is dropped): a request the server refuses with
    ``use_dpop_nonce`` is sent once more with the nonce it gave, and later proofs carry it from the start.
    """

    __slots__ = ("__weakref__", "_keys", "_lock", "_new_keys", "_nonces", "_warned", "alg", "key", "max_nonces")

    def __init__(self, *, alg: str = "ES256", key: DPoPKey | None = None, max_nonces: int = 256) -> None:
        if max_nonces < 1:
            raise ValueError("max_nonces must be at least 1")
        if key is None:
            DPoPKey.generate(alg)  # an unsupported alg fails here, not at the first refresh
        self.alg = key.alg if key is not None else alg
        """The algorithm of new per-session keys."""
        self.key = key
        """The key every session uses, or ``None`` for per-session keys."""
        self.max_nonces = max_nonces
        """How many origins' nonces are remembered."""
        self._lock = threading.Lock()
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._keys: OrderedDict[str, DPoPKey] = OrderedDict()
        self._new_keys: OrderedDict[str, DPoPKey] = OrderedDict()
        self._warned = False
        _forked.add(self)

    def _reset_in_child(self) -> None:  # pragma: no cover - runs in a forked child, which coverage does not follow
        # After fork(): a parent thread may have held the lock; the tables themselves are still right.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DPoP(alg={self.alg!r}, key={self.key!r})"

    # -- keys --------------------------------------------------------------------------------------

    def key_for(self, tokens: UpstreamTokens) -> DPoPKey | None:
        """The key ``tokens`` are bound to: the configured one, else the entry's own (``None`` if it has none).
        :class:`ReauthenticationRequired` when the entry's key cannot be read: the session can no longer prove
        possession of the key its grant is bound to (a per-session fault, not a setting for every session)."""
        if self.key is not None:
            return self.key
        jwk = tokens.dpop_key
        if jwk is None:
            return None
        with self._lock:
            found = self._keys.get(jwk)
            if found is not None:
                self._keys.move_to_end(jwk)
                return found
        try:
            found = DPoPKey.load(jwk)
        except ValueError:
            raise ReauthenticationRequired(
                "the stored entry's DPoP key (dpop_key) cannot be read, so its tokens cannot be used or refreshed; "
                "log the user in again"
            ) from None
        with self._lock:
            self._keys[jwk] = found
            if len(self._keys) > KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return found

    def key_for_refresh(self, tokens: UpstreamTokens) -> tuple[DPoPKey, bool]:
        """The key a refresh of ``tokens`` proves, and whether it is new (the entry had none: the refreshed
        entry must carry it).

        A new key is kept by refresh token: a second attempt with the same token (a retry after a lost
        answer, which the provider may have bound to the first key) proves the same key."""
        key = self.key_for(tokens)
        if key is not None:
            return key, False
        slot = hashlib.sha256((tokens.refresh_token or "").encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            made = self._new_keys.get(slot)
        if made is None:
            made = DPoPKey.generate(self.alg)
            with self._lock:
                made = self._new_keys.setdefault(slot, made)
                if len(self._new_keys) > NEW_KEYS_SIZE:
                    self._new_keys.popitem(last=False)
        return made, True

    # -- nonces ------------------------------------------------------------------------------------

    def nonce(self, url: str, role: str) -> str | None:
        """The nonce last given by the server at ``url``'s origin in ``role`` (``"token"`` or ``"resource"``)."""
        with self._lock:
            return self._nonces.get(f"{role} {origin_of(url)}")

    def remember(self, url: str, role: str, nonce: str | None) -> None:
        """Keep the ``DPoP-Nonce`` a server answered with (nothing when it sent none)."""
        if not nonce:
            return
        slot = f"{role} {origin_of(url)}"
        with self._lock:
            self._nonces[slot] = nonce
            self._nonces.move_to_end(slot)
            if len(self._nonces) > self.max_nonces:
                self._nonces.popitem(last=False)

    # -- API requests ------------------------------------------------------------------------------

    def authorize(self, request: Any, tokens: UpstreamTokens, now: float) -> None:
        """Set ``request``'s ``Authorization`` header, and for DPoP tokens its ``DPoP`` proof (``iat`` = ``now``)."""
        headers = request.headers
        headers["Authorization"] = tokens.authorization
        if tokens.token_type.lower() != "dpop":
            headers.pop("DPoP", None)
            return
        key = self.key_for(tokens)
        if key is None:
            raise ConfigurationError(
                "the stored entry holds a DPoP-bound token but no DPoP key (dpop_key); store the key the login "
                "used (UpstreamTokens(dpop_key=key.to_jwk())), or configure DPoP(key=...)",
                setting="dpop",
            )
        url = str(request.url)
        nonce = self.nonce(url, "resource")
        headers["DPoP"] = key.proof(request.method, url, access_token=tokens.access_token, nonce=nonce, now=now)

    def resend(self, response: Any, request: Any) -> Any | None:
        """Remember the nonce ``response`` carries, for the origin that sent it; the request to send once more
        with a fresh proof, or ``None``.

        That is the request our proof reached (``request``, or the hop of a redirect within its origin) when
        the server asked for a nonce; or, when a redirect took the proof signed for ``request``'s URL to
        another URL of the origin (an ``auth=`` flow cannot sign each hop) and the server refused it
        (``invalid_dpop_proof``), that hop, which a fresh proof names rightly."""
        answered = _answered(response, request)
        if answered is not request and "DPoP" in answered.headers:
            self._left_origin(request, answered)
        nonce = response.headers.get("dpop-nonce")
        self.remember(str(answered.url), "resource", nonce)
        if (
            "DPoP" not in answered.headers
            or not carried(response, request, request.headers.get("authorization", ""))
            or origin_of(str(answered.url)) != origin_of(str(request.url))
        ):
            return None
        if nonce is not None and is_nonce_challenge(response.status_code, response.headers):
            return answered
        if answered is not request and str(answered.url) != str(request.url) and is_proof_refused(response):
            return answered
        return None

    def _left_origin(self, request: Any, answered: Any) -> None:
        # An auth= flow does not see the hops of a redirect the client follows, and httpx drops only
        # Authorization on a hop to another origin: our proof went there. It is bound to the first URL and to
        # the token's hash, so it authorises nothing without the token, but it should not travel at all.
        # Nothing can call it back now; say so (a warning once, then at debug level) and how to avoid it.
        there = origin_of(str(answered.url))
        if there == origin_of(str(request.url)):
            return
        with self._lock:
            warned, self._warned = self._warned, True
        logger.log(
            logging.DEBUG if warned else logging.WARNING,
            "a redirect the httpx client followed took a DPoP proof to %s (the client drops only Authorization on "
            "such a hop); send DPoP requests through UpstreamAuthTransport, which signs each hop to the API's "
            "origin and sends nothing of ours elsewhere, or do not follow redirects",
            there,
        )


_forked: ForkRegistry[DPoP] = ForkRegistry(DPoP._reset_in_child)
