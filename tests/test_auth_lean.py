"""The lean HS256 check (fanout/protocol/hs256.py) against PyJWT, its
reference: on every token here, hostile ones included, both give the same
verdict (accepted or refused, and whether for the signature) and the same
decoded payload; auth.verify gives the same reason and claims as the
PyJWT-based verify it replaced. A table of hand-made cases, then a seeded
random walk of mutations and re-signed headers and payloads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import warnings

import jwt
import pytest

from fanout.protocol import auth, hs256
from fanout.protocol import fanout_pb2 as pb

SECRET = "lean-test-secret-0123456789-abcdefghij"
OTHER = "another-secret-0123456789-abcdefghijkl"
NOW = 1_800_000_000

_NO_CLAIM_CHECKS = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                    "verify_aud": False, "verify_iss": False, "verify_sub": False,
                    "verify_jti": False}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def raw_token(header, payload, secret: str = SECRET, *, sig: str | None = None) -> str:
    """A token from the given header and payload: objects are JSON-encoded,
    bytes and str are used as they are (str as UTF-8); signed with ``secret``
    unless ``sig`` (already encoded) is given."""
    def enc(part) -> str:
        if isinstance(part, str):
            part = part.encode("utf-8")
        elif not isinstance(part, bytes):
            part = json.dumps(part, separators=(",", ":")).encode()
        return b64(part)
    signing = enc(header) + "." + enc(payload)
    if sig is None:
        sig = b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())
    return signing + "." + sig


def claims(**extra) -> dict:
    return {"sub": "alice", "iat": NOW - 10, "exp": NOW + 3600, "rooms": "*", **extra}


HS = {"alg": "HS256", "typ": "JWT"}


def pyjwt_verdict(token, secret: str = SECRET) -> tuple:
    try:
        payload = jwt.decode(token, secret, algorithms=["HS256"], options=_NO_CLAIM_CHECKS)
    except jwt.InvalidSignatureError:
        return ("refused", "signature")
    except jwt.InvalidTokenError:
        return ("refused", "structure")
    except (ValueError, TypeError, OverflowError, RecursionError):
        # What the PyJWT-based verify counted as "does not decode".
        return ("refused", "structure")
    return ("accepted", repr(payload))


def lean_verdict(token, secret: str = SECRET) -> tuple:
    try:
        payload = hs256.decode(token, secret)
    except hs256.SignatureError:
        return ("refused", "signature")
    except hs256.TokenError:
        return ("refused", "structure")
    return ("accepted", repr(payload))


def old_verify(token: str, secret: str = SECRET, **kw) -> auth.Claims:
    """auth.verify as it was with PyJWT doing the decoding (the reference)."""
    if not token:
        raise auth.AuthError(pb.AUTH_MISSING, "hello carries no token")
    try:
        data = jwt.decode(token, secret, algorithms=["HS256"], options=_NO_CLAIM_CHECKS)
    except jwt.InvalidTokenError as exc:
        raise auth._invalid(f"invalid token: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise auth._invalid("token does not decode") from None
    if not isinstance(data, dict):
        raise auth._invalid("token payload is not an object")
    return auth._claims(data, issuer=kw.get("issuer", ""), audience=kw.get("audience", ""),
                        max_lifetime=kw.get("max_lifetime"), leeway=kw.get("leeway", 0.0),
                        now=kw.get("now", NOW))


def verify_outcome(fn, token, **kw):
    try:
        return ("ok", fn(token, SECRET, now=kw.pop("now", NOW), **kw))
    except auth.AuthError as exc:
        return ("refused", exc.reason)


def assert_same(token, secret: str = SECRET, **verify_kw) -> tuple:
    expected = pyjwt_verdict(token, secret)
    assert lean_verdict(token, secret) == expected, token[:300] if isinstance(token, str) else token
    if secret == SECRET and isinstance(token, str):
        old = verify_outcome(old_verify, token, **verify_kw)
        new = verify_outcome(auth.verify, token, **verify_kw)
        assert new == old, (token[:300], new, old)
    return expected


# ---------------------------------------------------------------- the table

def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _with_payload_length(rem: int) -> str:
    """A valid token whose payload segment's length is ≡ rem (mod 4)."""
    for k in range(8):
        tok = raw_token(HS, claims(pad="x" * k))
        if len(tok.split(".")[1]) % 4 == rem:
            return tok
    raise AssertionError(rem)


def _sign(signing: str, secret: str = SECRET) -> str:
    return signing + "." + b64(hmac.new(secret.encode(), signing.encode(),
                                        hashlib.sha256).digest())


def _padded(rem: int) -> str:
    """A token whose payload segment carries the '=' padding, signed so."""
    h, p, _ = _with_payload_length(rem).split(".")
    return _sign(f"{h}.{p}{'=' * (4 - rem)}")


def _standard_alphabet() -> str:
    """A valid token whose signature holds '-' or '_', in the standard
    alphabet ('+', '/') instead."""
    for k in range(100):
        h, p, s = raw_token(HS, claims(n=k)).split(".")
        if "-" in s or "_" in s:
            return f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}"
    raise AssertionError("no signature with - or _")


VALID = raw_token(HS, claims())
H, P, S = VALID.split(".")

TABLE = {
    "valid": (VALID, "accepted"),
    "minted": (auth.mint(SECRET, "bob", rooms=["a", "b"], ttl=60), "accepted"),
    # the algorithm
    "alg none, no signature": (raw_token({"alg": "none"}, claims(), sig=""), "refused"),
    "alg none, HS256 signature": (raw_token({"alg": "none"}, claims()), "refused"),
    "alg None (case)": (raw_token({"alg": "None"}, claims()), "refused"),
    "alg hs256 (case)": (raw_token({"alg": "hs256"}, claims()), "refused"),
    "alg HS384": (raw_token({"alg": "HS384"}, claims()), "refused"),
    "alg HS512": (raw_token({"alg": "HS512"}, claims()), "refused"),
    "alg RS256": (raw_token({"alg": "RS256"}, claims()), "refused"),
    "alg with a space": (raw_token({"alg": "HS256 "}, claims()), "refused"),
    "alg as list": (raw_token({"alg": ["HS256"]}, claims()), "refused"),
    "alg null": (raw_token({"alg": None}, claims()), "refused"),
    "alg missing": (raw_token({"typ": "JWT"}, claims()), "refused"),
    "alg empty": (raw_token({"alg": ""}, claims()), "refused"),
    "alg number": (raw_token({"alg": 256}, claims()), "refused"),
    "alg true": (raw_token({"alg": True}, claims()), "refused"),
    "alg fullwidth": (raw_token({"alg": "ＨＳ256"}, claims()), "refused"),
    "alg escaped": (raw_token('{"alg":"\\u0048S256"}', claims()), "accepted"),
    "alg with NUL": (raw_token('{"alg":"HS256\\u0000"}', claims()), "refused"),
    "duplicate alg, HS256 last": (raw_token('{"alg":"none","alg":"HS256"}', claims()),
                                  "accepted"),
    "duplicate alg, none last": (raw_token('{"alg":"HS256","alg":"none"}', claims()),
                                 "refused"),
    # other header members
    "typ and extras ignored": (raw_token({"alg": "HS256", "typ": "xyz", "x5u": "http://x",
                                          "jku": "http://y", "jwk": {"kty": "oct"}}, claims()),
                               "accepted"),
    "kid string ignored": (raw_token({"alg": "HS256", "kid": "k1"}, claims()), "accepted"),
    "kid number": (raw_token({"alg": "HS256", "kid": 1}, claims()), "refused"),
    "kid null": (raw_token({"alg": "HS256", "kid": None}, claims()), "refused"),
    "crit b64 with b64 true": (raw_token({"alg": "HS256", "crit": ["b64"], "b64": True},
                                         claims()), "accepted"),
    "crit b64 without b64": (raw_token({"alg": "HS256", "crit": ["b64"]}, claims()), "refused"),
    "crit unknown": (raw_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims()),
                     "refused"),
    "crit empty": (raw_token({"alg": "HS256", "crit": []}, claims()), "refused"),
    "crit a string": (raw_token({"alg": "HS256", "crit": "b64", "b64": True}, claims()),
                      "refused"),
    "crit non-string": (raw_token({"alg": "HS256", "crit": [1], "b64": True}, claims()),
                        "refused"),
    "b64 false": (raw_token({"alg": "HS256", "b64": False, "crit": ["b64"]}, claims()),
                  "refused"),
    "b64 false, empty payload": (raw_token({"alg": "HS256", "b64": False, "crit": ["b64"]},
                                           b""), "refused"),
    "b64 false, no crit": (raw_token({"alg": "HS256", "b64": False}, claims()), "refused"),
    "b64 0 is not false": (raw_token({"alg": "HS256", "b64": 0}, claims()), "accepted"),
    # the header is not a JSON object
    "header a list": (raw_token(["HS256"], claims()), "refused"),
    "header a string": (raw_token('"HS256"', claims()), "refused"),
    "header a number": (raw_token("256", claims()), "refused"),
    "header null": (raw_token("null", claims()), "refused"),
    "header not JSON": (raw_token("{alg: HS256}", claims()), "refused"),
    "header empty": (raw_token(b"", claims()), "refused"),
    "header invalid UTF-8": (raw_token(b'{"alg":"HS256\xff"}', claims()), "refused"),
    "header UTF-16": (raw_token('{"alg":"HS256"}'.encode("utf-16-le"), claims()), "accepted"),
    "header UTF-8 BOM": (raw_token(b'\xef\xbb\xbf{"alg":"HS256"}', claims()), "accepted"),
    "header trailing data": (raw_token('{"alg":"HS256"} x', claims()), "refused"),
    "header deeply nested": (raw_token('{"alg":"HS256","x":' + _deep(100000) + "}", claims()),
                             "refused"),
    # the payload is not a JSON object
    "payload a list": (raw_token(HS, ["sub", "alice"]), "refused"),
    "payload a string": (raw_token(HS, '"alice"'), "refused"),
    "payload a number": (raw_token(HS, "1"), "refused"),
    "payload null": (raw_token(HS, "null"), "refused"),
    "payload true": (raw_token(HS, "true"), "refused"),
    "payload empty": (raw_token(HS, b""), "refused"),
    "payload not JSON": (raw_token(HS, "{sub}"), "refused"),
    "payload deeply nested": (raw_token(HS, _deep(100000)), "refused"),
    "payload huge int": (raw_token(HS, '{"sub":"a","exp":' + "9" * 5000 + "}"), "refused"),
    "payload duplicate sub": (raw_token(HS, '{"sub":"a","sub":"b","exp":%d}' % (NOW + 60)),
                              "accepted"),
    "payload NaN exp": (raw_token(HS, '{"sub":"a","exp":NaN}'), "accepted"),
    "payload Infinity exp": (raw_token(HS, '{"sub":"a","exp":Infinity}'), "accepted"),
    "payload bool exp": (raw_token(HS, claims(exp=True)), "accepted"),
    "payload float exp": (raw_token(HS, claims(exp=float(NOW + 60))), "accepted"),
    "payload string exp": (raw_token(HS, claims(exp=str(NOW + 60))), "accepted"),
    "payload negative exp": (raw_token(HS, claims(exp=-1)), "accepted"),
    "payload expired": (raw_token(HS, claims(exp=NOW - 1)), "accepted"),
    "payload bool nbf": (raw_token(HS, claims(nbf=False)), "accepted"),
    "payload future nbf": (raw_token(HS, claims(nbf=NOW + 100)), "accepted"),
    "payload float iat": (raw_token(HS, claims(iat=1.5)), "accepted"),
    "payload sub number": (raw_token(HS, claims(sub=7)), "accepted"),
    "payload sub lone surrogate": (raw_token(HS, '{"sub":"\\ud800","exp":%d}' % (NOW + 60)),
                                   "accepted"),
    "payload rooms not a list": (raw_token(HS, claims(rooms={"a": 1})), "accepted"),
    "payload UTF-16": (raw_token(HS, json.dumps(claims()).encode("utf-16")), "accepted"),
    "payload invalid UTF-8": (raw_token(HS, b'{"sub":"\xc3"}'), "refused"),
    # the signature
    "signed with another key": (raw_token(HS, claims(), OTHER), "refused"),
    "empty signature": (f"{H}.{P}.", "refused"),
    "signature truncated": (VALID[:-4], "refused"),
    "signature one byte short": (f"{H}.{P}." + b64(base64.urlsafe_b64decode(S + "=")[:-1]),
                                 "refused"),
    "signature one byte long": (f"{H}.{P}." + b64(base64.urlsafe_b64decode(S + "=") + b"\0"),
                                "refused"),
    "signature of the payload alone": (f"{H}.{P}." + b64(hmac.new(
        SECRET.encode(), P.encode(), hashlib.sha256).digest()), "refused"),
    # base64url strictness
    "signature padded": (VALID + "=", "accepted"),
    "signature padded twice": (VALID + "==", "refused"),
    "signature padded thrice": (VALID + "===", "refused"),
    "payload padded to 4 (one =)": (_padded(3), "accepted"),
    "payload padded to 4 (two =)": (_padded(2), "accepted"),
    "header padding on a multiple of 4": (f"{H}{'=' * (4 - len(H) % 4) if len(H) % 4 else ''}"
                                          f"====.{P}.{S}", "refused"),
    "padding inside": (f"{H[:4]}={H[4:]}.{P}.{S}", "refused"),
    "standard alphabet in the signature": (_standard_alphabet(), "refused"),
    "space in signature": (f"{H}.{P}.{S[:5]} {S[5:]}", "refused"),
    "newline at end": (VALID + "\n", "refused"),
    "leading space": (" " + VALID, "refused"),
    "NUL in payload segment": (f"{H}.{P[:3]}\0{P[3:]}.{S}", "refused"),
    "fullwidth letter": (f"{H}.{P[:3]}Ａ{P[4:]}.{S}", "refused"),
    "lone surrogate": (f"{H}.{P}.{S}\ud800", "refused"),
    "length 1 mod 4": (f"{H}A.{P}.{S}" if len(H) % 4 == 0 else f"{H}.{P}.{S}A", "refused"),
    # segments
    "no dot": (H + P + S, "refused"),
    "one dot": (f"{H}.{P}", "refused"),
    "four segments": (f"{VALID}.{S}", "refused"),
    "dot in payload": (f"{H}.{P}.{P}.{S}", "refused"),
    "empty header": (f".{P}.{S}", "refused"),
    "only dots": ("..", "refused"),
    "one char": (".", "refused"),
    "huge token": (raw_token(HS, claims(pad="x" * 1_000_000)), "accepted"),
    "huge garbage": ("A" * 2_000_001, "refused"),
    "huge dots": ("." * 100_000, "refused"),
}


def _non_canonical(seg: str) -> str | None:
    """``seg`` with its last character's unused low bits set: the same bytes,
    a non-canonical encoding (None if the length leaves no spare bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(seg) % 4 not in (2, 3) or seg[-1] not in alphabet:
        return None
    i = alphabet.index(seg[-1])
    return seg[:-1] + alphabet[i | 1]


for _name, _idx in (("header", 0), ("payload", 1), ("signature", 2)):
    _parts = VALID.split(".")
    _odd = _non_canonical(_parts[_idx])
    if _odd is not None and _odd != _parts[_idx]:
        _parts[_idx] = _odd
        TABLE[f"non-canonical {_name}"] = (".".join(_parts), "refused")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_table_matches_pyjwt(name):
    token, expected = TABLE[name]
    verdict = assert_same(token)
    assert verdict[0] == expected, (name, verdict)


def test_the_table_covers_non_canonical_encodings():
    assert any(name.startswith("non-canonical") for name in TABLE)


def test_verify_refusals_keep_their_reason_codes():
    """A few verdicts pinned, not only compared: the comparison alone would
    pass if both sides accepted everything."""
    def outcome(tok, **kw):
        return verify_outcome(auth.verify, tok, **kw)
    assert outcome(VALID)[0] == "ok"
    assert outcome(TABLE["alg none, no signature"][0]) == ("refused", pb.AUTH_INVALID)
    assert outcome(TABLE["signed with another key"][0]) == ("refused", pb.AUTH_INVALID)
    assert outcome(raw_token(HS, claims(exp=NOW - 1))) == ("refused", pb.AUTH_EXPIRED)
    assert outcome(raw_token(HS, claims(exp=NOW - 1)), leeway=5)[0] == "ok"
    assert outcome(raw_token(HS, claims(nbf=NOW + 10)))[1] == pb.AUTH_INVALID
    assert outcome(raw_token(HS, claims(nbf=NOW + 10)), leeway=30)[0] == "ok"
    assert outcome(raw_token(HS, claims(exp=True)))[1] == pb.AUTH_INVALID
    assert outcome(raw_token(HS, claims(exp=float(NOW + 60))))[1] == pb.AUTH_INVALID
    assert outcome("")[1] == pb.AUTH_MISSING


@pytest.mark.parametrize("kw", [
    {}, {"issuer": "https://auth.example"}, {"audience": "fanout"},
    {"issuer": "https://auth.example", "audience": "fanout"}, {"max_lifetime": 600.0},
    {"leeway": 30.0}, {"now": NOW + 3590, "leeway": 20.0},
])
def test_claim_rules_match_the_pyjwt_based_verify(kw):
    cases = [claims(), claims(iss="https://auth.example"), claims(iss=["https://auth.example"]),
             claims(aud="fanout"), claims(aud=["x", "fanout"]), claims(aud=[["fanout"]]),
             claims(aud=7), claims(iss="https://auth.example", aud="fanout"),
             claims(exp=NOW + 500), claims(exp=NOW + 60, iat=NOW - 1000),
             claims(nbf=NOW + 20), claims(nbf=NOW - 20), claims(exp=NOW - 10),
             claims(exp=NOW + 3600 + 15), claims(rooms=["a", "b"]), claims(rooms=[1]),
             claims(rooms="all"), claims(sub=""), claims(sub="u" * 200), claims(exp=1 << 41)]
    for c in cases:
        tok = raw_token(HS, c)
        assert verify_outcome(auth.verify, tok, **dict(kw)) == \
            verify_outcome(old_verify, tok, **dict(kw)), (c, kw)


def test_secrets_pyjwt_refuses_are_refused_alike():
    for secret in ("", '{"kty": "oct", "k": "AAAA"}',
                   "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"):
        with pytest.raises(jwt.InvalidKeyError):
            jwt.decode(VALID, secret, algorithms=["HS256"], options=_NO_CLAIM_CHECKS)
        with pytest.raises(jwt.InvalidKeyError):
            hs256.decode(VALID, secret)


def test_other_secrets_including_short_and_non_ascii():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PyJWT warns about the short one
        for secret in ("short", "ключ-секрет-🔑-0123456789-abcdefghij", "x" * 1000):
            tok = raw_token(HS, claims(), secret)
            assert assert_same(tok, secret)[0] == "accepted"
            assert assert_same(tok, SECRET)[1] == "signature"
            assert assert_same(VALID, secret)[1] == "signature"


def test_bytes_and_non_text_tokens():
    assert lean_verdict(VALID.encode()) == pyjwt_verdict(VALID.encode())
    assert lean_verdict(VALID.encode())[0] == "accepted"
    for junk in (None, 7, ["a.b.c"]):
        assert lean_verdict(junk) == pyjwt_verdict(junk) == ("refused", "structure")


# ---------------------------------------------------------------- random walk

_CHARS = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
          "+/=.  \n\t\0é€Ａ\u200b\ud800{}\"[]:,")

_HEADER_VALUES = {
    "alg": ["HS256", "HS256", "HS256", "none", "HS384", "RS256", "hs256", "", None, 1, ["HS256"],
            "HS256\u0000", "ＨＳ256"],
    "typ": ["JWT", 1, None, {"a": 1}],
    "kid": ["k", "", 0, None, ["k"]],
    "crit": [["b64"], ["b64", "b64"], [], ["exp"], "b64", [None], ["b64", "exp"]],
    "b64": [True, False, 0, 1, None, "false"],
    "x5u": ["http://evil"],
}

_CLAIM_VALUES = {
    "sub": ["alice", "", 7, None, "\ud800", "é" * 70, ["alice"]],
    "exp": [NOW + 60, NOW - 60, True, False, float(NOW + 60), str(NOW + 60), None, -1, 1 << 41,
            NOW + 10**6],
    "iat": [NOW, NOW - 10**6, 1.0, True, "x", None],
    "nbf": [NOW - 5, NOW + 5, NOW + 50, False, 2.5, None],
    "rooms": ["*", ["a"], [], ["a", 1], "a", {"a": 1}, ["r" * 200], None],
    "iss": ["https://auth.example", "other", 1],
    "aud": ["fanout", ["fanout"], ["other"], 1],
}


def _random_json(rng: random.Random, values: dict, required: dict, extra: float) -> str:
    """A JSON object text from random members of ``values`` (sometimes
    duplicated keys, sometimes an extra member), always with ``required``
    unless the coin says otherwise; each other member with probability
    ``extra``."""
    members = []
    for key, choices in values.items():
        if key in required and rng.random() < 0.9:
            members.append((key, required[key] if rng.random() < 0.6 else rng.choice(choices)))
        elif rng.random() < extra:
            members.append((key, rng.choice(choices)))
    if members and rng.random() < 0.1:
        members.append((rng.choice(members)[0], rng.choice(list(values.values()))[0]))
    rng.shuffle(members)
    text = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in members) + "}"
    if rng.random() < 0.05:
        text = rng.choice(["[" + text + "]", text + " ", " " + text, text[:-1], "null", "1"])
    return text


def _mutate(rng: random.Random, token: str) -> str:
    op = rng.randrange(10)
    if not token:
        return rng.choice(_CHARS)
    i = rng.randrange(len(token))
    if op == 0:
        return token[:i] + rng.choice(_CHARS) + token[i + 1:]
    if op == 1:
        return token[:i] + token[i + 1:]
    if op == 2:
        return token[:i] + rng.choice(_CHARS) + token[i:]
    if op == 3:
        return token + "=" * rng.randrange(1, 4)
    if op == 4:
        parts = token.split(".")
        rng.shuffle(parts)
        return ".".join(parts)
    if op == 5:
        parts = token.split(".")
        return ".".join(parts + [rng.choice(parts)])
    if op == 6:
        return token[:i]
    if op == 7:
        j = rng.randrange(len(token))
        return token[:min(i, j)] + token[max(i, j):]
    parts = token.split(".")
    if op == 8:
        # one letter of the header or payload changed for another one of the
        # alphabet: still well formed, most often, but no longer signed
        k = rng.randrange(min(2, len(parts)))
        seg = parts[k]
        if seg:
            j = rng.randrange(len(seg))
            parts[k] = seg[:j] + rng.choice(_CHARS[:64]) + seg[j + 1:]
        return ".".join(parts)
    k = rng.randrange(len(parts))
    seg = parts[k]
    odd = _non_canonical(seg) if seg else None
    parts[k] = odd if odd is not None else seg + "A"
    return ".".join(parts)


def test_random_tokens_match_pyjwt():
    rng = random.Random(20261130)
    seen = {"accepted": 0, "signature": 0, "structure": 0}
    for n in range(6000):
        header = _random_json(rng, _HEADER_VALUES, {"alg": "HS256"}, 0.08)
        payload = _random_json(rng, _CLAIM_VALUES, {"sub": "alice", "exp": NOW + 60}, 0.3)
        secret = SECRET if rng.random() < 0.8 else OTHER
        tok = raw_token(header, payload, secret)
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 4])):
            tok = _mutate(rng, tok)
        verdict = assert_same(tok)
        seen["accepted" if verdict[0] == "accepted" else verdict[1]] += 1
    # The walk reached every outcome often enough to mean something.
    assert min(seen.values()) >= 400, seen


def test_header_verdicts_are_remembered_within_a_bound():
    """The header cache gives the same verdict on a second look, and holds
    at most _MAX_HEADERS entries whatever a client sends."""
    hs256._HEADERS.clear()
    refused = raw_token({"alg": "none"}, claims())
    for _ in range(2):
        assert lean_verdict(refused) == ("refused", "structure")
        assert lean_verdict(VALID)[0] == "accepted"
    for i in range(3 * hs256._MAX_HEADERS):
        assert assert_same(raw_token({"alg": "HS256", "kid": str(i)}, claims()))[0] == "accepted"
        assert assert_same(raw_token({"alg": "HS256", "kid": i}, claims()))[0] == "refused"
    assert len(hs256._HEADERS) == hs256._MAX_HEADERS
