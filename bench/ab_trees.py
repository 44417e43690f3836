"""A/B of nhigate's native front end from two (or more) source trees, interleaved.

    git worktree add /tmp/before <rev>
    .venv/bin/python bench/ab_trees.py before=/tmp/before,after=. [--rounds 8] [--duration 4]

One nginx upstream, one `proxy_bench.serve_nhigate` child per tree (its own `src/` first on
`PYTHONPATH`), every child pinned to the proxy CPU and wrk to the other, as proxy_bench.py
does. Each round runs wrk at 32 connections against every tree once, in turn, so a burst of
other work on the machine lands on one run of each tree rather than on all runs of one;
prints the median user and system CPU µs per request (from /proc) and req/s of each tree.
A change to the request path is judged on this, beside callgrind's instruction counts: on a
shared VM two full runs minutes apart differ by more than the change does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import peers
import proxy_bench as pb

PATH = "/v1/items/1"


def start_tree(tree: Path, up_port: int) -> tuple[subprocess.Popen[str], int, str]:
    """The nhigate child of `tree` (its `src/` first on `PYTHONPATH`); returns it, its port
    and its token."""
    port, admin = pb.free_port(), pb.free_port()
    os.environ["PYTHONPATH"] = str(tree / "src")
    try:
        process, token = pb.start_nhigate(
            up_port,
            port,
            admin,
            1000,
            os.devnull,
            http1_server="native",
            script=tree / "bench" / "proxy_bench.py",
        )
    finally:
        del os.environ["PYTHONPATH"]
    pb.wait_port(port)
    return process, port, token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("trees", help="name=path,name=path: the source trees to compare")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    args = parser.parse_args()
    trees = {
        name: Path(path).resolve()
        for name, path in (item.split("=", 1) for item in args.trees.split(","))
    }
    peers.ensure_packages({"nginx": "nginx", "wrk": "wrk"})
    processes: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="nhigate-ab-") as tmp:
        workdir = Path(tmp)
        up_port = pb.free_port()
        processes.append(
            pb.start_nginx(workdir, "upstream", pb.UPSTREAM_BODY.format(port=up_port), pb.LOAD_CPU)
        )
        try:
            pb.wait_port(up_port)
            children = {}
            for name, tree in trees.items():
                process, port, token = start_tree(tree, up_port)
                processes.append(process)
                script = workdir / f"{name}.lua"
                script.write_text(pb.WRK_SCRIPT.format(token=token))
                pb.run_wrk(name, f"http://127.0.0.1:{port}{PATH}", 4, 1, script)  # warm up
                children[name] = (process.pid, port, script)
            samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, (pid, port, script) in children.items():
                    user, system = pb.user_system(pid)
                    result = pb.run_wrk(
                        name, f"http://127.0.0.1:{port}{PATH}", 32, args.duration, script
                    )
                    user_after, system_after = pb.user_system(pid)
                    if result.non2xx or result.errors:
                        raise SystemExit(f"{name}: {result.non2xx} non-2xx, {result.errors} errors")
                    per = 1e6 / result.requests
                    samples[name].append(
                        ((user_after - user) * per, (system_after - system) * per, result.rps)
                    )
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)
    print(
        f"{'tree':<12} user us/req  sys us/req  total us/req      req/s  (medians of {args.rounds})"
    )
    for name, runs in samples.items():
        user = statistics.median(u for u, _, _ in runs)
        system = statistics.median(s for _, s, _ in runs)
        total = statistics.median(u + s for u, s, _ in runs)
        rps = statistics.median(r for _, _, r in runs)
        print(f"{name:<12} {user:11.1f} {system:11.1f} {total:13.1f} {rps:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
