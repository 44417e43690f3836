"""Reconcile throughput: N RouteGrants applied at once -> all Accepted, all Enforced.

    .venv/bin/python bench/reconcile_bench.py [--grants 1000] [--via api|kubectl]
        [--concurrency 32] [--timeout 300] [--json PATH]

On its own real control plane (see revocation_bench.py): the controller, one proxy replica
(`nhigate proxy --kube`, reporting its policy version through a Lease, so `Enforced` means
"in the policy that replica serves") and a backend. The N grants (one token subject each) are
written to one multi-document file and applied with ONE `kubectl apply --server-side`; the
clock starts just before that command. The RouteGrants are listed every 0.5 s until every one
is `Accepted=True` and `Enforced=True` (bounded by `--timeout`; a miss is reported with the
counts reached, not hidden). The controller's CPU seconds (user + system, from /proc) over the
run and its peak RSS (VmHWM) are recorded, as is the proxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from revocation_bench import Stack, control_plane, proc_usage, upstream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster import ControlPlane
from controller_harness import condition, route_grant
from nhigate.k8s import CONFIGMAPS, ROUTEGRANTS, KubeClient

POLL_S = 0.5


def grants_file(path: Path, namespace: str, count: int) -> list[dict[str, Any]]:
    """`count` RouteGrants, also written as one multi-document file (JSON documents are YAML)."""
    docs = [route_grant(namespace, f"g-{i:05d}", subject=f"client-{i}") for i in range(count)]
    path.write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    return docs


def counts(items: list[dict[str, Any]]) -> tuple[int, int]:
    """(Accepted=True, Enforced=True) among the listed RouteGrants."""
    accepted = sum(condition(g, "Accepted").get("status") == "True" for g in items)
    enforced = sum(condition(g, "Enforced").get("status") == "True" for g in items)
    return accepted, enforced


async def kubectl_apply(cp: ControlPlane, manifest: Path) -> None:
    """One `kubectl apply --server-side -f manifest`."""
    apply = await asyncio.create_subprocess_exec(
        cp.kubectl_path,
        "apply",
        "--server-side",
        "--field-manager=nhigate-bench",
        "-f",
        str(manifest),
        env=cp.env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await apply.communicate()
    if apply.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {stderr.decode()[-2000:]}")


async def concurrent_apply(kube: KubeClient, docs: list[dict[str, Any]], concurrency: int) -> None:
    """Server-side apply every document, `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(doc: dict[str, Any]) -> None:
        async with gate:
            await kube.apply(doc, field_manager="nhigate-bench")

    await asyncio.gather(*(one(d) for d in docs))


async def run(
    cp: ControlPlane,
    work: Path,
    grants: int,
    limit_s: float,
    via: str = "api",
    concurrency: int = 32,
) -> dict[str, Any]:
    """Apply `grants` RouteGrants at once and time Accepted and Enforced."""
    kube = await KubeClient.connect(cp.kubeconfig)
    stack = Stack(cp, kube, work)
    ns = stack.namespace
    manifest = work / "grants.yaml"
    docs = grants_file(manifest, ns, grants)
    try:
        async with upstream() as up:
            await stack.start(up)
            assert stack.controller.proc is not None
            assert stack.proxy is not None
            controller, proxy = stack.controller.proc.pid, stack.proxy.pid
            await asyncio.sleep(2.0)  # let startup reconciles finish: measure the grants only
            before = proc_usage(controller)
            started = time.monotonic()
            if via == "kubectl":
                await kubectl_apply(cp, manifest)
            else:
                await concurrent_apply(kube, docs, concurrency)
            applied_s = time.monotonic() - started
            accepted_s = enforced_s = None
            accepted = enforced = 0
            timeline: list[tuple[float, int, int]] = []
            while time.monotonic() - started < limit_s:
                items, _ = await kube.list(ROUTEGRANTS, ns)
                accepted, enforced = counts(items)
                now = time.monotonic() - started
                timeline.append((round(now, 2), accepted, enforced))
                if accepted_s is None and accepted == grants:
                    accepted_s = now
                if enforced == grants:
                    enforced_s = now
                    break
                await asyncio.sleep(POLL_S)
            after = proc_usage(controller)
            proxy_usage = proc_usage(proxy)
            configmap = await kube.get(CONFIGMAPS, "nhigate-api-policy", ns) or {}
    except BaseException:
        print(stack.controller.log_tail(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        await kube.close()
    policy_bytes = sum(len(v) for v in (configmap.get("data") or {}).values())
    policy_bytes += sum(len(v) for v in (configmap.get("binaryData") or {}).values())
    return {
        "benchmark": "reconcile",
        "grants": grants,
        "via": via if via == "kubectl" else f"api ({concurrency} in flight)",
        "timeout_s": limit_s,
        "apply_s": applied_s,
        "all_accepted_s": accepted_s,
        "all_enforced_s": enforced_s,
        "accepted_reached": accepted,
        "enforced_reached": enforced,
        "controller_cpu_s": after["cpu_s"] - before["cpu_s"],
        "controller_peak_rss_mib": after["peak_rss_mib"],
        "controller_rss_mib": after["rss_mib"],
        "proxy_peak_rss_mib": proxy_usage["peak_rss_mib"],
        "policy_configmap_bytes": policy_bytes,
        "timeline": timeline,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--via", choices=("api", "kubectl"), default="api")
    parser.add_argument("--concurrency", type=int, default=32, help="--via api: in flight")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nhigate-reconcile-") as tmp:
        work = Path(tmp)
        with control_plane(work) as cp:
            result = asyncio.run(
                run(cp, work, args.grants, args.timeout, args.via, args.concurrency)
            )

    def secs(value: float | None) -> str:
        return f"{value:.1f} s" if value is not None else f"not within {args.timeout:.0f} s"

    print(
        f"{args.grants} RouteGrants: applied via {result['via']} in {result['apply_s']:.1f} s; "
        f"all Accepted "
        f"{secs(result['all_accepted_s'])} ({result['accepted_reached']}); all Enforced "
        f"{secs(result['all_enforced_s'])} ({result['enforced_reached']}); controller "
        f"{result['controller_cpu_s']:.1f} CPU s, peak RSS "
        f"{result['controller_peak_rss_mib']:.0f} MiB"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
