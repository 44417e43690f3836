"""The client side of the real-node scenario, run inside a client pod with `kubectl exec`.

Stdlib only (it runs in the nhigate image). Every sub-command prints one JSON document and is
bounded in time:
  get URL [--token FILE]                one request: {"status", "body", "error"}
  connect HOST PORT [--timeout S]       a TCP connect: {"connected", "error"}
  probe URL --token FILE --until N --deadline S
                                        request every 20 ms until status N: {"first", "last_other"}
  load URL --token FILE --duration S [--workers N]
                                        steady load, new connection per request: counts by status
"""

import argparse
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse


def request(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", parts.path or "/", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as f:
        return f.read().strip()


def cmd_get(args: argparse.Namespace) -> dict[str, object]:
    try:
        status, body = request(args.url, read_token(args.token), args.timeout)
        return {"status": status, "body": body, "error": ""}
    except OSError as exc:
        return {"status": 0, "body": "", "error": f"{type(exc).__name__}: {exc}"}


def cmd_connect(args: argparse.Namespace) -> dict[str, object]:
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout):
            return {"connected": True, "error": ""}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


def cmd_probe(args: argparse.Namespace) -> dict[str, object]:
    token = read_token(args.token)
    deadline = time.time() + args.deadline
    last_other = None
    while time.time() < deadline:
        started = time.time()
        try:
            status, _ = request(args.url, token, 2.0)
        except OSError:
            status = 0
        if status == args.until:
            return {"first": started, "last_other": last_other}
        last_other = started
        time.sleep(0.02)
    return {"first": None, "last_other": last_other}


def cmd_load(args: argparse.Namespace) -> dict[str, object]:
    token = read_token(args.token)
    counts: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.time() + args.duration

    def worker() -> None:
        while time.time() < stop:
            try:
                status, _ = request(args.url, token, 5.0)
                key = str(status)
            except OSError as exc:
                key = "error"
                with lock:
                    if len(failures) < 20:
                        failures.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
            with lock:
                counts[key] = counts.get(key, 0) + 1
            time.sleep(args.interval)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"counts": counts, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("get")
    p.add_argument("url")
    p.add_argument("--token")
    p.add_argument("--timeout", type=float, default=5.0)
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("probe")
    p.add_argument("url")
    p.add_argument("--token", required=True)
    p.add_argument("--until", type=int, required=True)
    p.add_argument("--deadline", type=float, default=10.0)
    p = sub.add_parser("load")
    p.add_argument("url")
    p.add_argument("--token", required=True)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    handler = {"get": cmd_get, "connect": cmd_connect, "probe": cmd_probe, "load": cmd_load}[
        args.cmd
    ]
    json.dump(handler(args), sys.stdout)


if __name__ == "__main__":
    main()
