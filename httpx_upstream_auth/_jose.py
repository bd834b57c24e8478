"""Signed JWTs the client sends: RFC 7523 client assertions (and, through :mod:`._dpop`, RFC 9449 proofs).

Signing is PyJWT's over keys loaded by ``cryptography`` (the ``[jwt]`` extra); nothing here signs by hand.
Both are imported on first use, so an installation without the extra pays nothing until it asks for them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

__all__ = ["ASSERTION_TYPE", "ASYMMETRIC_ALGS", "SECRET_ALGS", "ClientAssertion", "load_jwt", "load_private_key"]

#: ``client_assertion_type`` of a JWT client assertion (RFC 7523 section 2.2).
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Algorithms for ``private_key_jwt`` (and DPoP proofs): a private key signs, its public half verifies.
ASYMMETRIC_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
#: Algorithms for ``client_secret_jwt``: the client secret is the HMAC key.
SECRET_ALGS = frozenset({"HS256", "HS384", "HS512"})


def load_jwt() -> Any:
    """PyJWT (with ``cryptography``), or an ``ImportError`` that says which extra installs them."""
    try:
        import cryptography  # noqa: F401 - PyJWT imports it lazily, and signs nothing asymmetric without it
        import jwt
    except ImportError:
        raise ImportError(
            "JWT client authentication and DPoP need PyJWT and cryptography: pip install 'httpx-upstream-auth[jwt]'"
        ) from None
    return jwt


def load_private_key(key: str | bytes | Mapping[str, Any]) -> tuple[Any, str | None, str | None]:
    """``(private key object, alg named by a JWK or None, kid named by a JWK or None)`` from a PEM (text or
    bytes) or a JWK (a mapping, or its JSON text). ``ValueError`` when it is neither, or holds no private key;
    the message never quotes the key."""
    jwt_module = load_jwt()
    if isinstance(key, Mapping) or (isinstance(key, str) and key.lstrip().startswith("{")):
        try:
            data = dict(key) if isinstance(key, Mapping) else json.loads(key)
            loaded = jwt_module.PyJWK(data)
        except (ValueError, TypeError, jwt_module.PyJWTError) as exc:
            raise ValueError(f"the key is not a usable JWK ({type(exc).__name__})") from None
        if not data.get("d"):
            raise ValueError("the JWK holds no private key (no 'd' member): a private key signs")
        return loaded.key, data.get("alg"), data.get("kid")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        raw = key.encode() if isinstance(key, str) else bytes(key)
        return load_pem_private_key(raw, password=None), None, None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the key is not an unencrypted PEM private key, nor a JWK ({type(exc).__name__})") from None


def default_alg(private_key: Any) -> str:
    """The usual algorithm for a key's type: RS256 for RSA, ES256/384/512 by curve, EdDSA for Ed25519."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {"secp384r1": "ES384", "secp521r1": "ES512"}.get(private_key.curve.name, "ES256")
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(private_key).__name__}: use an RSA, EC or Ed25519 key")


class ClientAssertion:
    """How a client proves who it is with a signed JWT (RFC 7523 section 2.2): ``private_key_jwt`` with a
    private key, ``client_secret_jwt`` with the client secret.

    Pass it as ``OAuth2Refresher(..., auth_method="private_key_jwt", client_assertion=ClientAssertion(pem))``.
    ``key`` is a private key as PEM (text or bytes) or as a JWK (a dict or its JSON text); for
    ``client_secret_jwt`` it is the client secret itself, with ``alg="HS256"`` (the refresher builds this
    one from its ``client_secret`` when none is given). ``alg`` defaults to the JWK's ``alg``, else to the
    key's usual one (RS256, ES256, EdDSA); RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA sign with
    a private key, HS256/384/512 with a secret. ``key_id`` goes in the JWT header as ``kid`` (default: the
    JWK's ``kid``). ``audience`` is the ``aud`` claim (default: the token endpoint's URL; pass the
    issuer's identifier for a provider that wants it). Every assertion lives ``lifetime`` seconds and has a
    fresh ``jti``: one is signed per token request, so a retry never presents the same assertion twice.

    Construction signs a test assertion, so a key that does not fit ``alg`` fails here (``ValueError``),
    not at the first refresh. The key never appears in ``repr`` nor in an error message.
    """

    __slots__ = ("_key", "alg", "audience", "key_id", "lifetime")

    def __init__(
        self,
        key: str | bytes | Mapping[str, Any],
        *,
        alg: str | None = None,
        key_id: str | None = None,
        audience: str | None = None,
        lifetime: float = 60.0,
    ) -> None:
        if not 0 < lifetime <= 600:
            raise ValueError("lifetime must be more than 0 and at most 600 seconds: an assertion is short-lived")
        load_jwt()  # a missing extra is an ImportError saying so, not a key that "cannot sign"
        signing: Any
        if alg in SECRET_ALGS:
            if isinstance(key, Mapping) or not key:
                raise ValueError(f"alg={alg} signs with the client secret: pass it as key (text or bytes)")
            signing, named_alg, named_kid = (key.encode() if isinstance(key, str) else bytes(key)), None, None
        else:
            signing, named_alg, named_kid = load_private_key(key)
            alg = alg or named_alg or default_alg(signing)
            if alg not in ASYMMETRIC_ALGS:
                raise ValueError(f"alg must be one of {', '.join(sorted(ASYMMETRIC_ALGS | SECRET_ALGS))}, got {alg!r}")
        self._key = signing
        self.alg: str = alg
        """The JWS algorithm every assertion is signed with."""
        self.key_id = key_id if key_id is not None else named_kid
        """The ``kid`` header, or ``None``."""
        self.audience = audience
        """The ``aud`` claim; ``None``: the token endpoint's URL."""
        self.lifetime = lifetime
        """Seconds from ``iat`` to ``exp`` of each assertion."""
        try:
            self.sign("check", "https://check.invalid/token", 1_700_000_000.0)
        except Exception as exc:  # PyJWT's errors for a key that does not fit the algorithm vary by key type
            raise ValueError(f"the key cannot sign {alg} ({type(exc).__name__}); check alg and the key") from None

    @property
    def is_secret(self) -> bool:
        """True for ``client_secret_jwt`` (an HMAC algorithm), false for ``private_key_jwt``."""
        return self.alg in SECRET_ALGS

    def sign(self, client_id: str, token_url: str, now: float) -> str:
        """A new assertion for ``client_id`` at ``now`` (epoch seconds): ``iss`` = ``sub`` = the client id,
        ``aud`` = :attr:`audience` or ``token_url``, ``iat``, ``exp``, and a fresh ``jti``."""
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.audience or token_url,
            "iat": int(now),
            "exp": int(now + self.lifetime),
            "jti": secrets.token_urlsafe(18),
        }
        headers = {"kid": self.key_id} if self.key_id is not None else None
        token: str = load_jwt().encode(claims, self._key, algorithm=self.alg, headers=headers)
        return token

    def __repr__(self) -> str:
        return f"ClientAssertion(alg={self.alg!r}, key_id={self.key_id!r}, audience={self.audience!r})"
