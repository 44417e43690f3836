"""The peers nhigate is measured against in bench/proxy_bench.py: HAProxy and oauth2-proxy.

Each peer verifies the same ES256 bearer token as nhigate on every request, in front of the
same upstream:

- HAProxy (Debian package, >= 2.5 for `jwt_verify`): the signature with a pinned `ES256`
  (the header's `alg` must say so too), `iss`, `aud`, `exp` and `sub` as ACLs, plus the
  method/path rule nhigate's grant has (GET on one segment under `/v1/items/`); the
  Authorization header is removed before the upstream. Its whole configuration is
  `haproxy_config()`, put verbatim in the report.
- oauth2-proxy (Go module, built once into ~/.cache/nhigate/bench-bin/): JWT-bearer mode
  (`--skip-jwt-bearer-tokens`, `--extra-jwt-issuers=ISSUER=AUDIENCE`) against a local OIDC
  discovery + JWKS endpoint (`OidcIssuer`, on 127.0.0.1 in the bench process). Its command
  line is `oauth2_proxy_args()`, put verbatim in the report.

`ensure_packages()` installs nginx, wrk and haproxy with apt-get when one is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OAUTH2_PROXY_MODULE = "github.com/oauth2-proxy/oauth2-proxy/v7"
OAUTH2_PROXY_VERSION = "v7.15.6"
BIN_CACHE = Path.home() / ".cache" / "nhigate" / "bench-bin"
DEBIAN_TOOLS = {"nginx": "nginx", "wrk": "wrk", "haproxy": "haproxy"}
"""Command on PATH -> the Debian package that provides it."""

RULE_METHOD = "GET"
RULE_PATH_REGEX = "^/v1/items/[^/]+$"
"""The rule nhigate's bench grant has (`GET /v1/items/*`), as HAProxy ACLs."""


def ensure_packages(commands: dict[str, str] = DEBIAN_TOOLS) -> None:
    """apt-get install the Debian packages whose command is missing (needs root)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"need root to apt-get install {' '.join(missing)}")
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    install = ["apt-get", "install", "-y", "-qq", *missing]
    subprocess.run(install, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)


def haproxy_version() -> str:
    """HAProxy's version, e.g. '2.6.12-1+deb12u4'."""
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=True)
    match = re.search(r"HAProxy version (\S+)", out.stdout)
    if match is None:
        raise RuntimeError(f"cannot read the HAProxy version from {out.stdout!r}")
    return match.group(1)


def haproxy_config(
    *, port: int, upstream: int, pem: Path, issuer: str, audience: str, subject: str
) -> str:
    """HAProxy doing the work nhigate does per request: the JWT verified, then the rule.

    A missing or unverifiable token is refused with 401, a verified one outside the rule
    with 403. Every claim is required to be present (a missing claim leaves the variable
    unset, which must not mean "allowed").
    """
    verify = f'jwt_verify("ES256","{pem}")'
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    # the token: an ES256 signature by the issuer's key, nothing else
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str ES256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),{verify} -m int 1 }}
    # its claims: issuer, audience, not expired, a subject
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
    http-request set-var(txn.sub) var(txn.bearer),jwt_payload_query('$.sub')
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 unless {{ var(txn.iss) -m str {issuer} }}
    http-request deny deny_status 401 unless {{ var(txn.aud) -m str {audience} }}
    http-request deny deny_status 401 unless {{ var(txn.exp) -m found }}
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
    # the grant: this subject may GET one item
    acl rule_subject var(txn.sub) -m str {subject}
    acl rule_method method {RULE_METHOD}
    acl rule_path path_reg {RULE_PATH_REGEX}
    http-request deny deny_status 403 unless rule_subject rule_method rule_path
    http-request del-header Authorization
    default_backend upstream

backend upstream
    server origin 127.0.0.1:{upstream}
"""


def start_haproxy(workdir: Path, config: str, cpu: str) -> subprocess.Popen[bytes]:
    """HAProxy in the foreground (`-db`) on `config`, pinned to `cpu`; checked first."""
    directory = workdir / "haproxy"
    directory.mkdir(exist_ok=True)
    conf = directory / "haproxy.cfg"
    conf.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refused its configuration:\n{check.stdout}{check.stderr}")
    return subprocess.Popen(
        ["taskset", "-c", cpu, "haproxy", "-db", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def oauth2_proxy_binary() -> Path:
    """oauth2-proxy at the pinned version, built from the Go module proxy once and cached."""
    directory = BIN_CACHE / f"oauth2-proxy-{OAUTH2_PROXY_VERSION}"
    binary = directory / "oauth2-proxy"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("need Go to build oauth2-proxy (Debian: apt-get install golang-go)")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"building oauth2-proxy {OAUTH2_PROXY_VERSION} into {directory} (once) ...", flush=True)
    env = {**os.environ, "GOBIN": str(directory), "GOFLAGS": "-mod=mod"}
    target = f"{OAUTH2_PROXY_MODULE}@{OAUTH2_PROXY_VERSION}"
    subprocess.run([go, "install", "-v", target], check=True, env=env, timeout=1800)
    print(f"built {binary}", flush=True)
    return binary


def oauth2_proxy_args(*, port: int, upstream: int, issuer: str, audience: str) -> list[str]:
    """oauth2-proxy's flags: bearer JWTs from `issuer` for `audience` only, no login flow."""
    return [
        f"--http-address=127.0.0.1:{port}",
        f"--upstream=http://127.0.0.1:{upstream}/",
        "--provider=oidc",
        f"--oidc-issuer-url={issuer}",
        f"--client-id={audience}",
        "--client-secret=unused-no-login-flow",
        # a fixed 32-byte cookie secret: sessions are never issued, bearer tokens only
        "--cookie-secret=bench-bench-bench-bench-bench-32",
        "--cookie-secure=false",
        "--email-domain=*",
        "--skip-jwt-bearer-tokens=true",
        f"--extra-jwt-issuers={issuer}={audience}",
        "--oidc-email-claim=sub",
        "--insecure-oidc-allow-unverified-email=true",
        "--pass-authorization-header=false",
        "--request-logging=false",
        "--auth-logging=false",
        "--standard-logging=false",
    ]


def start_oauth2_proxy(binary: Path, args: list[str], cpu: str) -> subprocess.Popen[bytes]:
    """oauth2-proxy with `args`, pinned to `cpu` (GOMAXPROCS=1, like the other proxies)."""
    return subprocess.Popen(
        ["taskset", "-c", cpu, str(binary), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GOMAXPROCS": "1"},
    )


def oauth2_proxy_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"v\d+\.\d+\.\d+", out.stdout + out.stderr)
    return match.group(0) if match else OAUTH2_PROXY_VERSION


class OidcIssuer:
    """OIDC discovery and JWKS on 127.0.0.1 (a thread of this process): the bench's issuer.

    `issuer` is its URL, the `iss` of the bench token; only discovery and the key set are
    served (there is no login flow in the bench).
    """

    def __init__(self, jwks: dict[str, Any]) -> None:
        self._jwks = jwks
        self.issuer = ""

    def __enter__(self) -> OidcIssuer:
        jwks = json.dumps(self._jwks).encode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = json.dumps(outer.discovery()).encode()
                elif self.path == "/jwks":
                    body = jwks
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        }

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
