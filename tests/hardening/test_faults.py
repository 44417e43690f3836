"""Fault injection: a broken upstream, a broken JWKS endpoint, a corrupted policy source and a
proxy process restarted under load. Each ends with: nothing allowed that should not be, one
audit record per decision, and a proxy that still serves.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from harness import (
    AUDIENCE,
    ISSUER,
    SUBJECT,
    ProxyThread,
    UpstreamThread,
    build_policy,
    claims_for,
    free_port,
    issuer_for,
    jwks_for,
    make_signing_key,
    raw_exchange,
    resource_documents,
    sign,
    token_grant,
    write_resources,
)

from nhigate.proxy.authn import Authenticator
from nhigate.proxy.policy_source import StandaloneSource

GRANTS = (token_grant("read", SUBJECT, ("/v1/items/**",), ("GET", "HEAD")),)
REPO = Path(__file__).resolve().parents[2]
KEY = make_signing_key("ES256", kid="faults-1")


def _get(port: int, path: str, token: str) -> tuple[int, bool]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    responses, _, closed = raw_exchange(port, request, timeout=5.0)
    return (responses[0].status if responses else 0), closed


# -- upstream faults --------------------------------------------------------------------------

UPSTREAM_FAULTS = [
    # mode, status the caller gets (0: a truncated response then a closed connection), reason
    ("rst", 502, "upstream_unavailable"),
    ("garbage", 502, "upstream_unavailable"),
    ("huge_header", 502, "upstream_unavailable"),  # regression: was forwarded whole (1 MiB)
    ("hang", 504, "upstream_timeout"),
    ("reset", 0, "allowed"),
    ("close_early", 0, "allowed"),
]


@pytest.mark.parametrize(("mode", "status", "reason"), UPSTREAM_FAULTS)
def test_upstream_fault_is_answered_quickly_audited_and_survived(
    mode: str, status: int, reason: str
) -> None:
    with ProxyThread(KEY, GRANTS, mode=mode, upstream_timeout=0.5) as proxy:
        token = proxy.token()
        rounds = 5
        for _ in range(rounds):
            started = time.monotonic()
            got, closed = _get(proxy.port, "/v1/items/1", token)
            assert time.monotonic() - started < 2.5, "the proxy did not answer quickly"
            assert got == status, (mode, got)
            if status == 0:
                assert closed  # head already sent: the only honest signal left is the close
        records = proxy.audit_records()
        assert len(records) == rounds
        assert {r["reason"] for r in records} == {reason}
        if status == 0:
            assert all("mid-body" in r["detail"] for r in records)
        # The same proxy serves again once the upstream behaves.
        proxy.upstream.mode = "ok"
        assert proxy.healthy()
        assert proxy.probe("/admin") == 403


def test_refused_upstream_is_502_and_denies_still_work() -> None:
    with ProxyThread(KEY, GRANTS, upstream_port=free_port(), connect_timeout=0.5) as proxy:
        for _ in range(5):
            assert _get(proxy.port, "/v1/items/1", proxy.token())[0] == 502
        assert proxy.probe("/admin") == 403
        records = proxy.audit_records()
        assert [r["reason"] for r in records] == ["upstream_unavailable"] * 5 + [
            "no_matching_grant"
        ]


# -- JWKS faults ------------------------------------------------------------------------------


def _fast_authenticator(settings: Any, session: Any, clock: Any) -> Authenticator:
    return Authenticator(
        (),
        session=session,
        clock=clock,
        min_refresh_interval=0.2,
        refresh_interval=0.3,
        jwks_timeout=0.5,
    )


def test_jwks_outage_slowness_and_bad_keys_keep_known_keys_and_deny_unknown_ones() -> None:
    from jwt_factory import JwksServer  # type: ignore[import-not-found]

    known = KEY
    unknown = make_signing_key("ES256", kid="faults-unknown")
    with ProxyThread(
        known, GRANTS, app_options={"authenticator_factory": _fast_authenticator}
    ) as proxy:
        server = JwksServer(jwks_for(known))
        proxy.call(server.__aenter__())
        try:
            issuer = issuer_for(known, jwks=None, jwks_uri=server.uri)
            policy = build_policy(known, GRANTS, issuer)
            proxy.call_soon(lambda: proxy.holder.swap(policy))

            def status(key: Any) -> int:
                token = sign(key, claims_for(ISSUER, AUDIENCE, SUBJECT))
                return _get(proxy.port, "/v1/items/1", token)[0]

            deadline = time.monotonic() + 5
            while status(known) != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status(known) == 200

            phases: list[tuple[str, dict[str, Any]]] = [
                ("down", {"status": 503, "delay": 0.0, "body": None}),
                ("slow", {"status": 200, "delay": 3.0, "body": None}),
                ("not json", {"status": 200, "delay": 0.0, "body": b"{not json"}),
                (
                    "huge",
                    {
                        "status": 200,
                        "delay": 0.0,
                        "body": b'{"keys": [' + b"{}," * 400_000 + b"{}]}",
                    },
                ),
                (
                    "bad key material",
                    {
                        "status": 200,
                        "delay": 0.0,
                        "body": orjson.dumps(
                            {
                                "keys": [
                                    {
                                        "kty": "EC",
                                        "crv": "P-256",
                                        "kid": known.kid,
                                        "x": "AA",
                                        "y": "AA",
                                    }
                                ]
                            }
                        ),
                    },
                ),
                (
                    "private key",
                    {
                        "status": 200,
                        "delay": 0.0,
                        "body": orjson.dumps({"keys": [{**known.public_jwk, "d": "c2VjcmV0"}]}),
                    },
                ),
                (
                    "hmac key",
                    {
                        "status": 200,
                        "delay": 0.0,
                        "body": orjson.dumps(
                            {
                                "keys": [
                                    {
                                        "kty": "oct",
                                        "kid": known.kid,
                                        "k": "c2VjcmV0",
                                        "alg": "HS256",
                                    }
                                ]
                            }
                        ),
                    },
                ),
            ]
            for name, knobs in phases:
                server.status = knobs["status"]
                server.delay = knobs["delay"]
                server.body = knobs["body"]
                hits = server.hits
                time.sleep(0.7)  # scheduled refreshes run against the broken endpoint
                started = time.monotonic()
                assert status(unknown) == 401, name  # an unknown kid: a refresh, never a bypass
                assert time.monotonic() - started < 2.0, f"{name}: unknown kid hung the request"
                assert status(known) == 200, f"{name}: the known key was lost"
                assert server.hits > hits, f"{name}: the broken endpoint was never fetched"
            reasons = [r["reason"] for r in proxy.audit_records()]
            assert reasons.count("unknown_key") == len(phases)
            authenticator = proxy.app_state().authenticator
            errors = authenticator.stats.jwks_refresh.get(("ci", "error"), 0)  # type: ignore[union-attr]
            assert errors >= len(phases)
            server.delay = 0.0
        finally:
            proxy.call(server.__aexit__(None, None, None))
        assert proxy.healthy()


# -- policy source faults ---------------------------------------------------------------------


def test_corrupted_resources_keep_the_last_good_policy_and_say_why(tmp_path: Path) -> None:
    directory = tmp_path / "resources"
    grants = {"read": (SUBJECT, ["GET"], ["/v1/items/**"])}
    write_resources(directory, resource_documents(KEY, grants))
    with ProxyThread(KEY, None) as proxy:  # type: ignore[arg-type]
        results: list[str] = []

        def on_reload(result: str) -> None:
            results.append(result)
            proxy.metrics.policy_reloads.labels(result).inc()

        source = StandaloneSource(
            directory, None, proxy.holder, clock=time.time, on_reload=on_reload
        )
        assert proxy.call(source.load_once())
        good = proxy.holder.current
        assert good is not None
        assert proxy.probe("/v1/items/1") == 200
        assert proxy.probe("/admin") == 403

        corruptions: dict[str, Callable[[], object]] = {
            "invalid YAML": lambda: (directory / "grant-read.yaml").write_text("spec: [: : {\n"),
            "half-written file": lambda: (directory / "grant-read.yaml").write_text(
                "apiVersion: nhigate.io/v1alpha1\nkind: RouteGrant\nmetadata:\n  name: re"
            ),
            "regex path": lambda: write_resources(
                directory, resource_documents(KEY, {"read": (SUBJECT, ["GET"], ["/v1/.*"])})
            ),
            "wildcard admin grant hidden in a bad file": lambda: (directory / "z.yaml").write_text(
                "apiVersion: nhigate.io/v1alpha1\nkind: RouteGrant\nmetadata: {name: all, "
                "namespace: payments}\nspec: {target: {protectedService: payments-api}, "
                "subjects: [{token: {issuer: ci, subject: ci-deployer}}], "
                "rules: [{methods: ['*'], paths: ['/**', '/../admin']}]}\n"
            ),
            "binary garbage": lambda: (directory / "grant-read.yaml").write_bytes(b"\x00\xff\xfe"),
            "directory removed": lambda: _remove_tree(directory),
        }
        for name, corrupt in corruptions.items():
            corrupt()
            assert not proxy.call(source.load_once()), name
            assert proxy.holder.current is good, name
            assert source.last_error, name
            assert proxy.probe("/v1/items/1") == 200, name
            assert proxy.probe("/admin") == 403, name
            assert proxy.probe("/v1/other") == 403, name
            _remove_tree(directory)
            write_resources(directory, resource_documents(KEY, grants))
            proxy.call(source.load_once())  # back to the good files (same version)
            assert proxy.holder.current is not None
            assert proxy.holder.current.version == good.version
        errors = proxy.metrics.registry.get_sample_value(
            "nhigate_proxy_policy_reloads_total", {"result": "error"}
        )
        assert errors == len(corruptions)
        assert results.count("error") == len(corruptions)
        records = proxy.audit_records()
        assert {r["policy_version"] for r in records} == {good.version}
        assert [r["decision"] for r in records].count("allow") == len(corruptions) + 1


def _remove_tree(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


# -- a proxy process restarted under load ------------------------------------------------------


def _start_proxy_process(
    directory: Path,
    upstream_port: int,
    port: int,
    admin: int,
    audit: Path,
    *extra: str,
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "nhigate.cli.main",
        "proxy",
        "--resources",
        str(directory),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--audit-log",
        str(audit),
        "--drain-timeout",
        "3",
        "--log-level",
        "WARNING",
        *extra,
    ]
    log = audit.with_suffix(".log")
    with log.open("ab") as stderr:  # the child keeps its own descriptor
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"proxy exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError("proxy did not become ready")


def _read_grant_files(tmp_path: Path) -> tuple[Path, Path, str]:
    """A resources directory granting GET /v1/items/** to SUBJECT, an audit file path, and a
    token of SUBJECT."""
    directory = tmp_path / "resources"
    write_resources(
        directory, resource_documents(KEY, {"read": (SUBJECT, ["GET"], ["/v1/items/**"])})
    )
    token = sign(KEY, claims_for(ISSUER, AUDIENCE, SUBJECT, lifetime=600))
    return directory, tmp_path / "audit.jsonl", token


def test_proxy_restarted_under_load_never_allows_an_ungranted_route(tmp_path: Path) -> None:
    directory, audit, token = _read_grant_files(tmp_path)
    port, admin = free_port(), free_port()
    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            path = f"/v1/items/{worker}-{n}" if n % 2 else f"/admin/{worker}-{n}"
            try:
                status, _ = _get(port, path, token)
            except OSError:
                status = -1  # refused while the process was down
                time.sleep(0.01)
            results.append((path, status))

    with UpstreamThread() as upstream:
        first = _start_proxy_process(directory, upstream.port, port, admin, audit)
        workers = [threading.Thread(target=load, args=(i,)) for i in range(3)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(1.5)
            first.send_signal(signal.SIGTERM)
            assert first.wait(10) == 0
            second = _start_proxy_process(directory, upstream.port, port, admin, audit)
            time.sleep(1.5)
        finally:
            stop.set()
            for worker in workers:
                worker.join(10)
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        received = list(upstream.messages)

    allowed_ungranted = [(p, s) for p, s in results if p.startswith("/admin") and s == 200]
    assert allowed_ungranted == []
    assert {s for p, s in results if p.startswith("/admin")} <= {403, 0, -1}
    assert {s for p, s in results if p.startswith("/v1/items")} <= {200, 503, 0, -1}
    assert all(m.path.startswith("/v1/items/") for m in received)
    answered = [s for _, s in results if s > 0]
    assert sum(1 for s in answered if s == 200) > 20, "load did not run through both processes"
    records = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    # Every answer the callers got has its audit record; every forwarded request was an allow.
    assert len(records) >= len(answered)
    assert sum(1 for r in records if r["decision"] == "allow") == len(received)
    print(
        f"restart under load: {len(results)} requests, {len(answered)} answered, "
        f"{len(received)} forwarded, {len(results) - len(answered)} refused while restarting"
    )


def test_native_workers_share_the_port_decide_alike_and_stop_together(tmp_path: Path) -> None:
    # `--workers 2 --http1-server native`: two processes on one SO_REUSEPORT port, each with
    # the native front end. Both must serve (request ids carry a per-process prefix), both must
    # refuse what is not granted, and SIGTERM to the parent must stop both cleanly.
    directory, audit, token = _read_grant_files(tmp_path)
    port, admin = free_port(), free_port()
    with UpstreamThread() as upstream:
        proxy = _start_proxy_process(
            directory,
            upstream.port,
            port,
            admin,
            audit,
            "--workers",
            "2",
            "--http1-server",
            "native",
        )
        try:
            results = [
                _get(port, f"/v1/items/{n}" if n % 2 else "/admin", token) for n in range(120)
            ]
        finally:
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(15) == 0
        received = list(upstream.messages)
    assert [status for status, _ in results[1::2]] == [200] * 60
    assert [status for status, _ in results[0::2]] == [403] * 60
    assert len(received) == 60
    assert all(m.path.startswith("/v1/items/") for m in received)
    records = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    assert len(records) == 120  # both workers' audit lines, none lost at the stop
    by_worker: dict[str, set[str]] = {}
    for record in records:
        by_worker.setdefault(record["request_id"][:8], set()).add(record["decision"])
    assert len(by_worker) == 2, sorted(by_worker)  # 120 new connections reached both workers
    assert all(decisions == {"allow", "deny"} for decisions in by_worker.values()), by_worker
