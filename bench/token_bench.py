"""Token verification cost per algorithm: nhigate's lean verifier cold vs cached, vs PyJWT.

Run: `.venv/bin/python bench/token_bench.py [--seconds 0.3]`. Pure CPU, no
network; each measurement runs for about `--seconds` of *process CPU time*
(`time.process_time`), so a busy shared machine inflates the numbers less
than wall-clock timing would.

Columns (µs per token, lower is better):
- `sig only`: the bare `cryptography` signature check (the floor for any verifier).
- `parse+claims`: `parse_token` + `validate_claims` alone (strict base64url/JSON, claim rules).
- `nhigate cold`: `Authenticator.authenticate` with the cache disabled: header
  parsing, strict base64url/JSON, key lookup, signature, claims.
- `nhigate cached`: the same token again (cache hit: hash + LRU + clock re-check).
- `PyJWT decode`: `jwt.decode(token, key, algorithms=[alg], audience=...)` with a
  pre-built key object (PyJWT's best case; it does fewer checks).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "proxy"))
from jwt_factory import claims_for, jwks_for, make_signing_key, sign

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity
from nhigate.proxy.authn import Authenticator
from nhigate.proxy.jwks import load_jwk
from nhigate.proxy.tokens import parse_token, validate_claims, verify_signature

ISS = "https://bench.example"
AUD = "bench-api"
ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (the verify path without a JWKS fetch)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("coroutine suspended")


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Mean µs per call over ~`seconds`, after a short warm-up; the best of three runs."""
    for _ in range(20):
        fn()
    calls = 50
    while True:
        start = time.process_time()
        for _ in range(calls):
            fn()
        elapsed = time.process_time() - start
        if elapsed > seconds / 10:
            break
        calls *= 2
    n = max(1, int(calls * seconds / 3 / elapsed))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return best * 1e6


def bench(alg: str, seconds: float) -> dict[str, float]:
    key = make_signing_key(alg, f"{alg}-bench")
    token = sign(key, claims_for(ISS, AUD, lifetime=3000, scope="deploy"))
    header = f"Bearer {token}"
    config = IssuerConfig(
        name="bench",
        issuer=ISS,
        audiences=(AUD,),
        algorithms=ALGORITHMS,
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=jwks_for(key),
    )
    cold = Authenticator([config], cache_size=0)
    cached = Authenticator([config])
    assert isinstance(run_sync(cold.authenticate(header)), Identity)
    assert isinstance(run_sync(cached.authenticate(header)), Identity)
    parsed = parse_token(token)
    verification_key = load_jwk(key.public_jwk).key
    pyjwt_key = jwt.PyJWK(key.public_jwk).key
    assert jwt.decode(token, pyjwt_key, algorithms=[alg], audience=AUD)["sub"]
    results = {
        "sig only": per_call_us(
            lambda: verify_signature(verification_key, alg, parsed.signing_input, parsed.signature),
            seconds,
        ),
        "parse+claims": per_call_us(
            lambda: validate_claims(parse_token(token).claims, config, time.time()), seconds
        ),
        "nhigate cold": per_call_us(lambda: run_sync(cold.authenticate(header)), seconds),
        "nhigate cached": per_call_us(lambda: run_sync(cached.authenticate(header)), seconds),
        "PyJWT decode": per_call_us(
            lambda: jwt.decode(token, pyjwt_key, algorithms=[alg], audience=AUD), seconds
        ),
    }
    return results


def main() -> None:
    """Print one table row per algorithm."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    args = parser.parse_args()
    columns = ("sig only", "parse+claims", "nhigate cold", "nhigate cached", "PyJWT decode")
    print(f"{'alg':<7}" + "".join(f"{c:>16}" for c in columns) + f"{'PyJWT/cold':>12}")
    for alg in ALGORITHMS:
        r = bench(alg, args.seconds)
        ratio = r["PyJWT decode"] / r["nhigate cold"]
        print(f"{alg:<7}" + "".join(f"{r[c]:>16.1f}" for c in columns) + f"{ratio:>11.2f}x")
    print("µs per token, one core; cached = verified-token cache hit")


if __name__ == "__main__":
    main()
