"""A lean HS256 JWS check: PyJWT's ``jwt.decode(token, secret,
algorithms=["HS256"])`` verdict (signature and structure; the claims are
:mod:`.auth`'s job) at a fifth of its cost.

PyJWT spends most of a connect storm's token check on work that does not
depend on the token: preparing the key (a JSON parse of the secret, PEM and
SSH sniffing) and the HMAC key schedule, both per call, and a generator over
every character of the token. Here the key is prepared once per secret (by
PyJWT's own ``prepare_key``, so a secret it refuses is refused the same way)
and the HMAC state is copied, not rebuilt.

The rules are PyJWT 2.x's, step for step, and ``tests/test_auth_lean.py``
holds this module to PyJWT's verdicts on the same tokens, hostile ones
included:

* three segments split at the first and the last dot (a dot in between makes
  the payload segment invalid base64url);
* each segment strict base64url: the URL-safe alphabet only, at most two
  ``=`` and only on a length that is a multiple of 4, no length ≡ 1 (mod 4),
  and the canonical encoding (no stray low bits in the last character);
* the header a JSON object; ``b64: false`` (a detached payload) refused;
  ``kid``, if present, a string; ``crit``, if present, a non-empty list of
  strings that are each ``"b64"`` and present in the header; other header
  members ignored;
* ``alg`` exactly ``"HS256"`` (``none``, other algorithms, other types
  refused), whatever else the header says;
* the signature compared in constant time (:func:`hmac.compare_digest`);
* the payload decoded only after the signature verifies, and a JSON object.

JSON is parsed by :func:`json.loads` on the bytes, as PyJWT does (the same
encoding detection, duplicate keys and number rules).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import warnings
from functools import lru_cache

ALGORITHM = "HS256"

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_PADS = (b"", b"===", b"==", b"=")         # by len % 4 (1 never gets here)


#: Header segments already judged: None (acceptable) or why refused. An
#: issuer signs every token with the same header, so a storm parses it
#: once; the verdict depends on the bytes alone. Bounded: past the bound,
#: new headers are judged and not kept.
_HEADERS: dict[bytes, str | None] = {}
_MAX_HEADERS = 64


class TokenError(Exception):
    """The token is refused; the text says why (one line)."""


class SignatureError(TokenError):
    """Well formed, but the signature is not this secret's."""


@lru_cache(maxsize=16)
def _mac(secret: str) -> hmac.HMAC:
    """The HMAC state keyed with ``secret``, to copy per token."""
    from jwt.algorithms import HMACAlgorithm    # PyJWT decides which secrets are keys
    alg = HMACAlgorithm(HMACAlgorithm.SHA256)
    key = alg.prepare_key(secret)                # raises InvalidKeyError as PyJWT would
    short = alg.check_key_length(key)
    if short:
        # PyJWT warns on every decode; once per secret says the same.
        from jwt.warnings import InsecureKeyLengthWarning
        warnings.warn(short, InsecureKeyLengthWarning, stacklevel=3)
    return hmac.new(key, digestmod=hashlib.sha256)


def _segment(seg: bytes, name: str) -> bytes:
    stripped = seg.rstrip(b"=")
    padding = len(seg) - len(stripped)
    if (padding > 2 or (padding and len(seg) % 4) or len(stripped) % 4 == 1
            or stripped.translate(None, _ALPHABET)):
        raise TokenError(f"invalid {name} encoding")
    std = stripped.translate(_TO_STANDARD) + _PADS[len(stripped) % 4]
    try:
        decoded = binascii.a2b_base64(std)
    except binascii.Error:
        raise TokenError(f"invalid {name} encoding") from None
    # Canonical only: "eA" and "eB" decode alike; PyJWT refuses the one
    # that does not encode back.
    if binascii.b2a_base64(decoded, newline=False).translate(_TO_URLSAFE).rstrip(b"=") \
            != stripped:
        raise TokenError(f"invalid {name} encoding")
    return decoded


def _json_object(data: bytes, name: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise TokenError(f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError(f"{name} is not a JSON object")
    return value


def _check_header(header: dict) -> None:
    if header.get("b64", True) is False:
        raise TokenError("detached payloads (b64: false) are not accepted")
    if "kid" in header and not isinstance(header["kid"], str):
        raise TokenError("header 'kid' must be a string")
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or not crit:
            raise TokenError("header 'crit' must be a non-empty list")
        for ext in crit:
            if not isinstance(ext, str):
                raise TokenError("header 'crit' values must be strings")
            if ext != "b64":
                raise TokenError("header 'crit' names an unsupported extension")
            if ext not in header:
                raise TokenError("header 'crit' names an extension the header lacks")
    if header.get("alg") != ALGORITHM:
        raise TokenError("the token's algorithm is not HS256")


def _judge_header(seg: bytes) -> str | None:
    try:
        _check_header(_json_object(_segment(seg, "header"), "header"))
        refused = None
    except TokenError as exc:
        refused = str(exc)
    if len(_HEADERS) < _MAX_HEADERS:
        _HEADERS[seg] = refused
    return refused


def decode(token: str | bytes, secret: str) -> dict:
    """The payload of ``token`` if it is an HS256 JWS signed with ``secret``.

    :raises TokenError: (:class:`SignatureError` for a bad signature) for any
        token PyJWT refuses; never another exception for a str or bytes token.
    :raises jwt.InvalidKeyError: ``secret`` is not usable as an HMAC key.
    """
    mac = _mac(secret)
    if isinstance(token, str):
        try:
            token = token.encode("utf-8")
        except UnicodeEncodeError:              # a lone surrogate
            raise TokenError("token is not valid Unicode") from None
    elif not isinstance(token, bytes):
        raise TokenError("token must be text")
    signing_input, dot, crypto = token.rpartition(b".")
    header_seg, dot2, payload_seg = signing_input.partition(b".")
    if not dot or not dot2:
        raise TokenError("not enough segments")
    try:
        refused = _HEADERS[header_seg]
    except KeyError:
        refused = _judge_header(header_seg)
    if refused is not None:
        raise TokenError(refused)
    payload = _segment(payload_seg, "payload")
    signature = _segment(crypto, "signature")
    mac = mac.copy()
    mac.update(signing_input)
    if not hmac.compare_digest(signature, mac.digest()):
        raise SignatureError("signature does not verify")
    return _json_object(payload, "payload")
