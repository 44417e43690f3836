"""The local demo: a real control plane, the controller, one proxy replica and a backend.

Run through `hack/demo.sh --local`, which prepares the virtualenv and the binaries first.
Everything listens on 127.0.0.1 and is stopped at the end, also on Ctrl-C or failure; the control
plane through tests/cluster.py, as the test suite stops its own, and the demo exits 1 if any of
its processes survives that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the control plane helpers the test suite uses

from cluster import (  # noqa: E402
    ControlPlane,
    ControlPlaneError,
    build_binaries,
    start_control_plane,
    stop_control_plane,
)

NAMESPACE = "payments"
SERVICE = "payments-api"
POLICY_CONFIGMAP = f"nhigate-{SERVICE}-policy"
DEMO_KEY = ROOT / "examples" / "demo-keys" / "demo-issuer-es256.key.pem"
CONDITIONS_JSONPATH = (
    "jsonpath={range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{'\\n'}{end}"
)
CI_SUBJECT = "repo:acme/payments:ref:refs/heads/main"
NHIGATE = str(Path(sys.executable).with_name("nhigate"))


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EchoBackend(BaseHTTPRequestHandler):
    """The protected backend: answers with the path and headers it received."""

    def _answer(self) -> None:
        body = json.dumps(
            {"backend": "payments-api", "path": self.path, "headers": dict(self.headers)}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:
        return


def mint_token(subject: str, claims: dict[str, str], lifetime_s: int = 600) -> str:
    """A token from the demo issuer (examples/issuer.yaml); its key is demo-only."""
    now = int(time.time())
    payload = {
        "iss": "https://issuer.demo.nhigate.example",
        "sub": subject,
        "aud": "payments-api",
        "iat": now,
        "exp": now + lifetime_s,
        **claims,
    }
    return jwt.encode(
        payload, DEMO_KEY.read_bytes(), algorithm="ES256", headers={"kid": "demo-issuer-2025"}
    )


def request(url: str, method: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []
        self.cp: ControlPlane | None = None
        self.env = dict(os.environ)

    def run(self, *args: str, check: bool = True, quiet: bool = False) -> str:
        out = subprocess.run(
            args, env=self.env, check=False, capture_output=True, text=True, cwd=ROOT
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        if not quiet and out.stdout.strip():
            print(out.stdout.rstrip(), flush=True)
        return out.stdout

    def kubectl(self, *args: str, check: bool = True, quiet: bool = False) -> str:
        return self.run("kubectl", *args, check=check, quiet=quiet)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes.append(proc)
        return proc

    def wait_for(self, what: str, check: object, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if check() if callable(check) else check:
                    return
            time.sleep(0.2)
        raise RuntimeError(
            f"timed out after {timeout_s:.0f}s waiting for {what} (logs in {self.work})"
        )

    def start_control_plane(self) -> None:
        say("starting etcd + kube-apiserver + kube-controller-manager on 127.0.0.1")
        # A watchdog stops it if this process dies without cleaning up (NHIGATE_CP_WATCH_PID).
        self.cp = start_control_plane(self.work / "control-plane", build_binaries())
        self.env = self.cp.env()
        print(self.kubectl("get", "--raw", "/readyz", quiet=True).strip() or "ready")

    def apply_resources(self) -> None:
        say(
            "applying the CRDs and examples/ (namespace, backend, issuer, protected service,"
            " two grants, a revocation)"
        )
        self.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        self.kubectl(
            "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", quiet=True
        )
        # examples/ is self-contained: the namespace first, then the backend Deployment+Service
        # (its pods never start here, without a kubelet; the local echo server stands in).
        self.kubectl("apply", "--server-side", "-f", str(ROOT / "examples"))

    def stop(self) -> bool:
        """Stop the controller, the proxy and the control plane; False, having said what is
        left, when a process survives."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if self.cp is None:
            return True
        try:
            stop_control_plane(self.cp)
        except ControlPlaneError as err:
            print(f"\ncleanup FAILED: {err}", file=sys.stderr)
            return False
        return True


def audit_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith("{")]


def next_audit_line(path: Path, seen: int, timeout_s: float = 5.0) -> str:
    """The audit record written after the first `seen` ones (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = audit_lines(path)
        if len(lines) > seen:
            return lines[seen]
        time.sleep(0.05)
    raise RuntimeError(f"no audit record #{seen + 1} in {path} after {timeout_s:.0f}s")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="nhigate-demo-"))
    demo = Demo(work)
    status = 1
    try:
        status = run(demo)
    finally:
        stopped = demo.stop()
        if stopped:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"processes are left running; their PID files and logs are in {work}")
    return status if stopped else 1


def run(demo: Demo) -> int:
    """The demo's steps; 0 when each showed what it should."""
    started = time.monotonic()
    work = demo.work
    try:
        demo.start_control_plane()
        demo.apply_resources()

        backend_port = free_port()
        backend = ThreadingHTTPServer(("127.0.0.1", backend_port), EchoBackend)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        say(f"backend payments-api listening on 127.0.0.1:{backend_port}")

        say("starting the controller (nhigate controller)")
        demo.spawn(
            "controller",
            NHIGATE,
            "controller",
            "--kubeconfig",
            demo.env["KUBECONFIG"],
            "--namespace",
            NAMESPACE,
            "--liveness",
            f"127.0.0.1:{free_port()}",
        )
        demo.wait_for(
            f"the controller to write ConfigMap {POLICY_CONFIGMAP}",
            lambda: demo.kubectl("get", "configmap", POLICY_CONFIGMAP, "-n", NAMESPACE, quiet=True),
        )

        proxy_port, admin_port = free_port(), free_port()
        audit = work / "audit.jsonl"
        say(f"starting a proxy replica on 127.0.0.1:{proxy_port} (policy watched via the API)")
        demo.spawn(
            "proxy",
            NHIGATE,
            "proxy",
            "--kube",
            "--kubeconfig",
            demo.env["KUBECONFIG"],
            "--namespace",
            NAMESPACE,
            "--policy-configmap",
            POLICY_CONFIGMAP,
            "--replica-name",
            "demo-proxy-0",
            "--upstream",
            f"http://127.0.0.1:{backend_port}",
            "--http1-server",
            "native",  # the front end the controller's Deployment runs for this service
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--audit-log",
            str(audit),
        )
        demo.wait_for(
            "the proxy to load its policy (/readyz)",
            lambda: request(f"http://127.0.0.1:{admin_port}/readyz", "GET", None)[0] == 200,
        )
        base = f"http://127.0.0.1:{proxy_port}"
        token = mint_token(CI_SUBJECT, {"job": "deploy"})
        audited = len(audit_lines(audit))

        say("ALLOWED: the CI deploy job reads a payment (grant ci-deploy: GET /v1/payments/**)")
        status, body = request(f"{base}/v1/payments/42", "GET", token)
        print(f"GET /v1/payments/42 -> {status}")
        seen = json.loads(body)["headers"] if status == 200 else {}
        print(
            f"  backend saw path {json.loads(body)['path'] if status == 200 else '-'}, "
            f"X-Nhigate-Subject={seen.get('X-Nhigate-Subject')!r}, "
            f"Authorization forwarded: {'Authorization' in seen}"
        )
        print(f"  audit: {next_audit_line(audit, audited)}")
        audited += 1
        if status != 200:
            raise RuntimeError(f"expected 200, got {status}: {body}")

        say("DENIED: the same job tries to delete a payment (no grant allows DELETE)")
        status, body = request(f"{base}/v1/payments/42", "DELETE", token)
        print(f"DELETE /v1/payments/42 -> {status} {body.strip()}")
        print(f"  audit: {next_audit_line(audit, audited)}")
        audited += 1
        if status != 403:
            raise RuntimeError(f"expected 403, got {status}")

        say("DENIED: no token at all")
        status, _ = request(f"{base}/v1/payments/42", "GET", None)
        print(f"GET /v1/payments/42 without a token -> {status}")
        print(f"  audit: {next_audit_line(audit, audited)}")
        audited += 1

        demo.wait_for(
            "RouteGrant ci-deploy to be Enforced",
            lambda: (
                demo.kubectl(
                    "get",
                    "routegrant",
                    "ci-deploy",
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Enforced')].status}",
                    quiet=True,
                ).strip()
                == "True"
            ),
        )
        say("kubectl get nhigate -n payments")
        demo.kubectl("get", "nhigate", "-n", NAMESPACE)

        say("REVOKE: kubectl delete routegrant ci-deploy")
        demo.kubectl("delete", "routegrant", "ci-deploy", "-n", NAMESPACE)
        t0 = time.monotonic()
        status, sent = 200, 0
        while status == 200 and time.monotonic() - t0 < 10:
            status, _ = request(f"{base}/v1/payments/42", "GET", token)
            sent += 1
        latency_ms = (time.monotonic() - t0) * 1000
        print(f"GET /v1/payments/42 -> {status} after {latency_ms:.0f} ms ({sent} requests)")
        print(f"  audit: {next_audit_line(audit, audited + sent - 1)}")
        if status != 403:
            raise RuntimeError(f"expected 403 after revocation, got {status}")

        say("status on the resources")
        demo.kubectl("get", "nhigate", "-n", NAMESPACE)
        demo.kubectl(
            "get",
            "protectedservice",
            SERVICE,
            "-n",
            NAMESPACE,
            "-o",
            CONDITIONS_JSONPATH,
        )
        print(
            "(Ready/ProxyAvailable stay False here: this local control plane has no kubelet, so the"
            "\n proxy Deployment's pods never start; the replica serving above is a local process.)"
        )
        say(f"demo finished in {time.monotonic() - started:.0f}s; cleaning up")
        return 0
    except (RuntimeError, OSError, KeyError, ValueError, IndexError) as err:
        print(f"\ndemo FAILED: {err}", file=sys.stderr)
        for log in sorted(work.glob("*.log")):
            print(f"--- last lines of {log.name} ---", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
