"""Turn `results.json` (written by bench/run.py) into `report.md` and PNG plots.

    .venv/bin/python bench/report.py OUT/results.json [--out DIR]

Pure functions over the results dict: `targets()`, `render_markdown()`, one `plot_*()` per
figure, and `write_report()` that writes them all. A part that failed or was not run is
reported as "not measured" with its reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

JSON = dict[str, Any]
MIB_PER_MB = 1e6 / 2**20

PLOTS = {
    "overhead": "overhead.png",
    "decide": "decide_p99.png",
    "revocation": "revocation_cdf.png",
    "scale": "scale_rps.png",
}
"""File name of each plot under the output directory."""


@dataclass(frozen=True)
class Target:
    """One target of issue 7 and where this run stands on it."""

    name: str
    target: str
    measured: str
    met: bool | None
    """None when the part was not measured."""


def part(results: JSON, name: str) -> JSON | None:
    """The result dict of a part that ran successfully, else None."""
    entry = (results.get("parts") or {}).get(name) or {}
    if entry.get("status") != "ok":
        return None
    result = entry.get("result")
    return result if isinstance(result, dict) else None


def proxy_row(proxy: JSON, case: str, connections: int) -> JSON | None:
    """The proxy bench result row for `case` at `connections`."""
    for row in proxy.get("results") or ():
        if row.get("name") == case and row.get("connections") == connections:
            found: JSON = row
            return found
    return None


def proxy_ratio(proxy: JSON, case: str, connections: int) -> JSON | None:
    """The proxy bench ratio row for `case` at `connections`."""
    for row in proxy.get("ratios") or ():
        if row.get("case") == case and row.get("connections") == connections:
            found: JSON = row
            return found
    return None


def decide_case(decide: JSON, grants: int, case: str = "spread") -> JSON | None:
    """The decide bench row for `grants` grants of kind `case`."""
    for row in decide.get("cases") or ():
        if row.get("grants") == grants and row.get("case") == case:
            found: JSON = row
            return found
    return None


def _target(
    name: str, target: str, value: float | None, fmt: Callable[[float], str], ok: bool
) -> Target:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Target(name, target, "not measured", None)
    return Target(name, target, fmt(value), ok)


def added_p99_target(proxy: JSON, case: str = "nhigate", label: str = "") -> Target:
    """`case`'s p99 minus direct's at 1 connection; a negative difference is noise."""
    name, goal = f"{label}added p99 latency at 1 connection", "<= 1 ms"
    ratio = proxy_ratio(proxy, case, 1)
    mine, direct = proxy_row(proxy, case, 1), proxy_row(proxy, "direct", 1)
    if ratio is None or mine is None or direct is None:
        return Target(name, goal, "not measured", None)
    added = float(ratio["added_p99_ms"])
    detail = f"({case} p99 {mine['p99_ms']:.2f} ms, direct {direct['p99_ms']:.2f} ms)"
    if added < 0:
        return Target(name, goal, f"≤ 0 ms, within noise {detail}", True)
    return Target(name, goal, f"{added:.2f} ms {detail}", added <= 1.0)


RELOADS = ("one-changed", "one-added", "1%-changed")
"""reload_bench.py's scenarios that are reloads (its `first` is a replica's start-up)."""


def reload_target(reload: JSON | None) -> Target:
    """A cluster replica's reload of 10k grants (reload_bench.py, the previous policy held),
    judged on the CPU of the costliest scenario."""
    name, goal = "reload of 10k grants (ConfigMap: gunzip + decode + compile)", "<= 200 ms"
    medians = (reload or {}).get("median_cpu_ms") or {}
    if not all(isinstance(medians.get(s), int | float) for s in RELOADS):
        return Target(name, goal, "not measured", None)
    worst = max(float(medians[s]) for s in RELOADS)
    each = ", ".join(f"{s} {float(medians[s]):.0f}" for s in RELOADS)
    runs = (reload or {}).get("runs")
    measured = f"{worst:.0f} ms CPU (worst of {each}; median of {runs} processes)"
    return Target(name, goal, measured, worst <= 200)


NATIVE = "nhigate-native"
"""The proxy bench case of nhigate on its native HTTP/1.1 front end (`--http1-server both`)."""


def native_targets(proxy: JSON) -> list[Target]:
    """Issue 16's targets, judged on the native front end's row (absent: not measured)."""
    label = "native front end"
    ratio = proxy_ratio(proxy, NATIVE, 32)
    vs_nginx = ratio.get("rps_per_core_vs_nginx") if ratio else None
    mine, haproxy = proxy_row(proxy, NATIVE, 32), proxy_row(proxy, "haproxy+jwt", 32)
    vs_haproxy = (
        float(haproxy["cpu_us"]) / float(mine["cpu_us"])
        if mine and haproxy and mine.get("cpu_us") and haproxy.get("cpu_us")
        else None
    )
    out = [
        _target(
            f"{label}: req/s per core vs nginx (32 conn)",
            ">= 30%",
            vs_nginx,
            lambda v: f"{v * 100:.0f}%",
            vs_nginx is not None and vs_nginx >= 0.30,
        ),
        _target(
            f"{label}: req/s per core vs HAProxy + jwt_verify (32 conn)",
            ">= 1.5x",
            vs_haproxy,
            lambda v: f"{v:.2f}x",
            vs_haproxy is not None and vs_haproxy >= 1.5,
        ),
    ]
    out.append(added_p99_target(proxy, NATIVE, f"{label}: "))
    return out


def targets(results: JSON) -> list[Target]:
    """Issue 7's targets, then issue 16's (native front end), against this run's numbers."""
    out: list[Target] = []
    proxy = part(results, "proxy") or {}
    for conns in (32, 1):
        ratio = proxy_ratio(proxy, "nhigate", conns)
        value = ratio.get("rps_per_core_vs_nginx") if ratio else None
        out.append(
            _target(
                f"authorised req/s per core vs nginx ({conns} conn)",
                ">= 25%",
                value,
                lambda v: f"{v * 100:.0f}%",
                value is not None and value >= 0.25,
            )
        )
    out.append(added_p99_target(proxy))
    decide = part(results, "decide") or {}
    row = decide_case(decide, 10_000)
    p99 = row.get("p99_us") if row else None
    out.append(
        _target(
            "decide() p99 at 10k grants",
            "<= 20 µs",
            p99,
            lambda v: f"{v:.1f} µs",
            p99 is not None and p99 <= 20,
        )
    )
    out.append(reload_target(part(results, "reload")))
    scale = part(results, "scale") or {}
    failed = (scale.get("reload") or {}).get("failed_requests")
    out.append(
        _target(
            "requests failed during 10k-grant reloads",
            "0",
            None if failed is None else float(failed),
            lambda v: (
                f"{v:.0f} of {(scale['reload'].get('under_reload') or {}).get('requests', 0)}"
            ),
            failed == 0,
        )
    )
    revocation = part(results, "revocation") or {}
    for key, label in _revocation_scenarios(revocation):
        label = label.replace("create Revocation", "Revocation")
        p99 = (revocation.get(key) or {}).get("p99_ms")
        out.append(
            _target(
                f"revocation p99: {label}",
                "<= 1 s",
                p99,
                lambda v: f"{v:.0f} ms",
                p99 is not None and p99 <= 1000,
            )
        )
    reconcile = part(results, "reconcile") or {}
    grants = reconcile.get("grants", 1000)
    enforced = reconcile.get("all_enforced_s")
    if reconcile and enforced is None:
        out.append(
            Target(
                f"{grants} grants Accepted and Enforced",
                "<= 60 s",
                f"not within {reconcile.get('timeout_s', 0):.0f} s "
                f"({reconcile.get('enforced_reached', 0)} enforced)",
                False,
            )
        )
    else:
        out.append(
            _target(
                f"{grants} grants Accepted and Enforced",
                "<= 60 s",
                enforced,
                lambda v: f"{v:.1f} s",
                enforced is not None and enforced <= 60,
            )
        )
    rss = reconcile.get("controller_peak_rss_mib")
    out.append(
        _target(
            "controller peak RSS during that reconcile",
            "<= 250 MB",
            rss,
            lambda v: f"{v / MIB_PER_MB:.0f} MB ({v:.0f} MiB)",
            rss is not None and rss / MIB_PER_MB <= 250,
        )
    )
    if proxy_row(proxy, NATIVE, 32) is not None:
        out += native_targets(proxy)
    return out


# --- plots -------------------------------------------------------------------------------------


def plot_overhead(results: JSON, path: Path) -> bool:
    """Bars: req/s per core (from CPU per request) for each proxy, per connection count."""
    proxy = part(results, "proxy")
    if not proxy:
        return False
    rows = proxy.get("results") or []
    # `direct` has no proxy: its CPU is the origin's own, not comparable per core
    cases = [c for c in dict.fromkeys(r["name"] for r in rows) if c != "direct"]
    conns = sorted({r["connections"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.5))
    width = 0.8 / max(1, len(conns))
    for i, c in enumerate(conns):
        values = [(proxy_row(proxy, case, c) or {}).get("rps_per_core", 0.0) for case in cases]
        xs = [x + i * width for x in range(len(cases))]
        bars = ax.bar(xs, values, width, label=f"{c} connection{'s' if c > 1 else ''}")
        ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in values], fontsize=8)
    ax.set_xticks([x + width * (len(conns) - 1) / 2 for x in range(len(cases))], cases)
    ax.set_ylabel("requests/s per core (1e6 / CPU µs per request)")
    ax.set_title("Reverse proxies: requests/s one core serves (higher is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_decide(results: JSON, path: Path) -> bool:
    """decide() p50/p99 (µs) against grant count, log x."""
    decide = part(results, "decide")
    if not decide:
        return False
    rows = sorted(
        (r for r in decide.get("cases") or () if r.get("case") == "spread"),
        key=lambda r: r["grants"],
    )
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["grants"] for r in rows]
    ax.plot(xs, [r["p99_us"] for r in rows], "o-", label="p99")
    ax.plot(xs, [r["p50_us"] for r in rows], "s--", label="p50")
    ax.axhline(20, color="red", linestyle=":", label="target p99 at 10k: 20 µs")
    ax.set_xscale("log")
    ax.set_xlabel("grants in the policy")
    ax.set_ylabel("decide() time, µs")
    ax.set_ylim(bottom=0)
    ax.set_title("Authorisation decision time vs policy size")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


REVOCATION_SCENARIOS = (
    ("delete_grant", "delete RouteGrant"),
    ("revoke_jti", "create Revocation (jti)"),
    ("delete_serviceaccount", "delete ServiceAccount"),
    ("delete_pod", "delete Pod (pod-bound token)"),
)
"""(result key, label) of the revocation bench's scenarios; the last two are absent from
results recorded before they existed, and then not shown."""


def _revocation_scenarios(revocation: JSON) -> list[tuple[str, str]]:
    first_two = list(REVOCATION_SCENARIOS[:2])
    return first_two + [(k, v) for k, v in REVOCATION_SCENARIOS[2:] if k in revocation]


def plot_revocation(results: JSON, path: Path) -> bool:
    """CDF of revocation latency for both scenarios."""
    revocation = part(results, "revocation")
    if not revocation:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in _revocation_scenarios(revocation):
        samples = sorted((revocation.get(key) or {}).get("samples_ms") or [])
        if samples:
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            ax.step(samples, ys, where="post", label=f"{label} (n={len(samples)})")
    ax.axvline(1000, color="red", linestyle=":", label="target p99: 1 s")
    ax.set_xlabel("API call returned → first refusal (403, or 401 for retired identities), ms")
    ax.set_ylabel("fraction of trials")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_title("Revocation latency on a real API server (CDF)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_scale(results: JSON, path: Path) -> bool:
    """Proxy req/s and RSS against grant count."""
    scale = part(results, "scale")
    if not scale or not scale.get("throughput"):
        return False
    rows = sorted(scale["throughput"], key=lambda r: r["grants"])
    xs = [r["grants"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(
        xs,
        [1e6 / r["cpu_us"] if r.get("cpu_us") else 0 for r in rows],
        "o-",
        label="req/s per core",
    )
    ax.plot(xs, [r["rps"] for r in rows], "s--", label="req/s (wall clock)")
    ax.set_xscale("log")
    ax.set_xlabel("grants in the policy")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(xs, [r["rss_mib"] for r in rows], "^:", color="gray", label="RSS (MiB)")
    twin.set_ylabel("proxy RSS, MiB")
    twin.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    ax.set_title("nhigate proxy throughput and memory vs policy size")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- markdown ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _not_measured(results: JSON, name: str) -> list[str]:
    entry = (results.get("parts") or {}).get(name)
    if not entry:
        return ["_Not run in this invocation._", ""]
    reason = entry.get("error") or entry.get("status", "unknown")
    return [f"_Not measured: {entry.get('status')}: {str(reason).strip()[-400:]}_", ""]


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _machine(results: JSON) -> list[str]:
    m = results.get("machine") or {}
    v = results.get("versions") or {}
    lines = ["## Machine and versions", ""]
    lines += _table(
        ["what", "value"],
        [
            ["CPU", f"{m.get('cpu_model', '?')} — {m.get('cores', '?')} cores"],
            ["memory", f"{_fmt(m.get('mem_total_gib'))} GiB"],
            ["kernel", str(m.get("kernel", "?"))],
            [
                "load average (1/5/15 min) before",
                " / ".join(f"{x:.2f}" for x in m.get("load_before") or ()),
            ],
            [
                "load average (1/5/15 min) after",
                " / ".join(f"{x:.2f}" for x in m.get("load_after") or ()),
            ],
            *[[name, str(version)] for name, version in sorted(v.items())],
        ],
    )
    lines += [
        "",
        "A load average above the core count means other work shared the machine: wall-clock "
        "req/s then understates what a quiet core does; CPU time per request (and req/s per core "
        "derived from it) is the steadier figure.",
        "",
    ]
    return lines


def _proxy_section(results: JSON) -> list[str]:
    lines = ["## Proxy overhead", ""]
    proxy = part(results, "proxy")
    if not proxy:
        return lines + _not_measured(results, "proxy")
    lines += [
        "Direct upstream vs nginx reverse proxy (no auth) vs HAProxy verifying the JWT on every "
        "request with a method/path/subject ACL (`haproxy+jwt`) vs oauth2-proxy in JWT-bearer "
        "mode vs nhigate (1k-grant policy, cached token) vs nhigate with an audit file and "
        "/metrics scrapes. Every authenticating proxy verifies the same ES256 token and had to "
        "refuse a forged one before it was measured. Proxy on CPU 0; wrk and the upstream "
        "on CPU 1. Each row is the median of the repeats. req/s per core = 1e6 / the proxy's CPU "
        "µs per request (for `direct`, the upstream's own CPU).",
        "",
        f"![proxy overhead]({PLOTS['overhead']})",
        "",
    ]
    rows = []
    for r in proxy.get("results") or ():
        rows.append(
            [
                r["name"],
                str(r["connections"]),
                f"{r['rps']:.0f}",
                f"{r.get('rps_per_core', 0):.0f}",
                f"{r.get('cpu_us', 0):.1f}",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r.get('p999_ms', 0):.3f}",
                str(r.get("non2xx", 0) + r.get("errors", 0)),
            ]
        )
    lines += _table(
        [
            "case",
            "conns",
            "req/s",
            "req/s/core",
            "CPU µs/req",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "failed",
        ],
        rows,
    )
    lines += ["", "Ratios:", ""]
    rows = []
    for r in proxy.get("ratios") or ():
        rows.append(
            [
                r["case"],
                str(r["connections"]),
                f"{r['rps_vs_direct']:.2f}",
                f"{r['rps_vs_nginx']:.2f}",
                f"{r.get('rps_per_core_vs_nginx', 0):.2f}",
                f"{r['added_p50_ms']:.3f}",
                f"{r['added_p99_ms']:.3f}",
                f"{r.get('added_p999_ms', 0):.3f}",
            ]
        )
    lines += _table(
        [
            "case",
            "conns",
            "req/s ÷ direct",
            "req/s ÷ nginx",
            "req/s/core ÷ nginx",
            "added p50 ms",
            "added p99 ms",
            "added p99.9 ms",
        ],
        rows,
    )
    return [*lines, "", *_peer_configs(proxy), *_peer_checks()]


PEER_CHECKS: list[tuple[str, str, str, str]] = [
    (
        "signature",
        "yes (verified once per token, then cached)",
        "yes, `jwt_verify` on every request",
        "yes, on every request (go-oidc)",
    ),
    (
        "alg allow-list",
        "per IdentityIssuer; `none`/HMAC cannot be configured",
        "the `alg` header must equal the pinned `ES256` (ACL in the config); "
        "`jwt_verify` takes the alg from its argument",
        "the discovery document's `id_token_signing_alg_values_supported` (RS256 when absent)",
    ),
    (
        "exp / nbf / aud / iss",
        "all four, with clock skew and a lifetime cap",
        "only what the config writes as ACLs: `exp`, `aud`, `iss` here; no `nbf`, no skew, "
        "`aud` compared as one string (an `aud` array is refused); `jwt_verify` itself checks "
        "no claim",
        "`exp`, `aud` (the `=AUDIENCE` of `--extra-jwt-issuers`), `iss`, `nbf` when present",
    ),
    (
        "key rotation / JWKS refresh",
        "JWKS fetched and refreshed; unknown `kid` refreshes (rate-limited); keys survive "
        "an outage",
        "no JWKS: a PEM file named in the config, read at start; a new key needs a reload",
        "JWKS from discovery, refetched when a token's `kid` is unknown",
    ),
    (
        "token cache",
        "yes (verified tokens, evicted on key rotation)",
        "no (every request pays the ECDSA verification)",
        "no (every request pays the verification)",
    ),
    (
        "method/path rule per subject",
        "RouteGrants: methods + normalised path patterns per subject",
        "ACLs on `method`, `path` (raw, not normalised) and the `sub` claim, written by hand",
        "none: any valid token of the issuer reaches every path "
        "(`--skip-auth-route` only bypasses auth)",
    ),
    (
        "audit line per decision",
        "yes, one JSON record per allow/deny with reason",
        "a log line per request if `log` is configured (off here, as for nginx); no reason",
        "`--request-logging` / `--auth-logging` lines (off here)",
    ),
    (
        "revocation",
        "Revocation resources (jti/subject), enforced within seconds",
        "none built in",
        "none for bearer JWTs",
    ),
    (
        "header stripping",
        "`Authorization` never reaches the upstream; identity headers are the proxy's",
        "`Authorization` removed by `del-header` in the config",
        "the caller's `Authorization` (the bearer token) reaches the upstream: "
        "`--skip-auth-strip-headers` strips it only where `--pass-authorization-header` "
        "would set it",
    ),
]
"""What each peer checks compared with nhigate: from docs/security.md, HAProxy 2.6's
configuration manual (`jwt_verify`), oauth2-proxy v7.15.6's flag descriptions and go-oidc
v3's verifier; the HAProxy column is proven on the bench configuration by
tests/unit/test_bench_peers.py."""


def _instructions_section(results: JSON) -> list[str]:
    lines = ["## Instructions per proxied request (callgrind)", ""]
    counted = part(results, "instructions")
    if not counted:
        return lines + _not_measured(results, "instructions")
    lines += [
        "User-space instructions per request of nhigate under valgrind's callgrind: "
        f"{counted['requests']} sequential requests on one keep-alive connection after 50 "
        "warm-ups, nginx upstream, `PYTHONHASHSEED=0`. Unlike CPU time this does not move "
        "with the machine's load; kernel socket work is not counted.",
        "",
    ]
    rows = [
        [
            f"nhigate, `{row['http1_server']}` front end"
            if "http1_server" in row
            else f"`{row.get('proxy')}` (bench/floor_proxy.py: checks nothing)",
            f"{row['instructions_per_request']:,.0f}",
            str(row.get("non200", 0)),
        ]
        for row in counted.get("front_ends") or [counted]
    ]
    lines += _table(["proxy", "instructions / request", "non-200"], rows)
    return [*lines, ""]


def _peer_configs(proxy: JSON) -> list[str]:
    """Each peer's configuration, verbatim, so a reader can run the same comparison."""
    peers = proxy.get("peers") or {}
    if not peers:
        return []
    lines = ["### Peer configurations", ""]
    haproxy = peers.get("haproxy+jwt")
    if haproxy:
        lines += [
            f"HAProxy {haproxy.get('version', '?')} (`haproxy -db -f haproxy.cfg`, "
            "pinned to CPU 0; ports and the key path are per run):",
            "",
            "```haproxy",
            haproxy.get("config", "").rstrip(),
            "```",
            "",
        ]
    o2 = peers.get("oauth2-proxy")
    if o2:
        env = " ".join(f"{k}={v}" for k, v in (o2.get("env") or {}).items())
        lines += [
            f"oauth2-proxy {o2.get('version', '?')} (built from `{o2.get('module', '?')}`), "
            "pinned to CPU 0, discovery + JWKS served by the bench on 127.0.0.1:",
            "",
            "```sh",
            " ".join(x for x in (env, shlex.join(o2.get("command") or [])) if x),
            "```",
            "",
        ]
    return lines


def _peer_checks() -> list[str]:
    lines = ["### What each peer checks", ""]
    rows = [list(row) for row in PEER_CHECKS]
    lines += _table(["property", "nhigate", "HAProxy + jwt_verify", "oauth2-proxy"], rows)
    return [*lines, ""]


def _reload_section(results: JSON) -> list[str]:
    """reload_bench.py: a replica's reloads, each against the policy it holds (CPU ms)."""
    lines = ["### Reload of a cluster replica (reload_bench.py)", ""]
    reload = part(results, "reload")
    if not reload:
        return lines + _not_measured(results, "reload")
    medians = reload.get("median_cpu_ms") or {}
    every = reload.get("cpu_ms") or {}
    rows = [
        [
            name,
            _fmt(medians.get(name), ".0f"),
            ", ".join(f"{v:.0f}" for v in every.get(name) or ()),
        ]
        for name in ("first", *RELOADS)
    ]
    lines += [
        f"{reload.get('grants', 0):,} grants, each run a fresh process: `first` is its "
        "start-up, each later version reloads against the policy it holds "
        "(ConfigMap base64 → gunzip → decode → compile, reusing unchanged grants).",
        "",
    ]
    lines += _table(["version", "CPU ms (median)", "CPU ms per process"], rows)
    return [*lines, ""]


def _policy_section(results: JSON) -> list[str]:
    lines = ["## Policy scale", "", "### decide() vs grants", ""]
    decide = part(results, "decide")
    if decide:
        lines += [f"![decide p99 vs grants]({PLOTS['decide']})", ""]
        runs = decide.get("runs", 1)
        if runs > 1:
            lines += [
                f"Median of {runs} runs of decide_bench (each per-call timed); "
                "the p99 of every run is listed: one preempted run moves a p99 a lot.",
                "",
            ]
        rows = [
            [
                r["case"],
                f"{r['grants']:,}",
                f"{r['p50_us']:.2f}",
                f"{r['p99_us']:.2f}",
                ", ".join(f"{v:.1f}" for v in r.get("p99_us_runs") or [r["p99_us"]]),
                f"{r.get('max_us', 0):.1f}",
            ]
            for r in decide.get("cases") or ()
        ]
        header = ["grants spread", "grants", "p50 µs", "p99 µs", "p99 µs per run", "max µs"]
        lines += _table(header, rows)
        ten_k = decide_case(decide, 10_000)
        if ten_k:
            lines += [
                "",
                "Policy build and reload at 10k grants (best of repeats, wall / CPU):",
                "",
            ]
            steps = [
                ("make_and_encode", "controller: build + encode the document"),
                ("pack", "controller: gzip for the ConfigMap"),
                ("reload", "replica start: decode + compile (nothing to reuse)"),
                ("reload_packed", "replica start: gunzip + decode + compile"),
            ]
            lines += _table(
                ["step", "wall ms", "CPU ms"],
                [
                    [
                        label,
                        _fmt(ten_k.get(f"{key}_ms"), ".0f"),
                        _fmt(ten_k.get(f"{key}_cpu_ms"), ".0f"),
                    ]
                    for key, label in steps
                ],
            )
            size = ten_k.get("document_bytes")
            packed = ten_k.get("packed_bytes")
            if size and packed:
                lines += [
                    "",
                    f"Document {size / 1024:.0f} KiB, packed {packed / 1024:.0f} KiB "
                    "(ConfigMaps hold at most 1 MiB).",
                ]
        lines.append("")
    else:
        lines += _not_measured(results, "decide")
    lines += _reload_section(results)
    lines += ["### Proxy throughput and memory vs grants", ""]
    scale = part(results, "scale")
    if not scale:
        return lines + _not_measured(results, "scale")
    lines += [f"![scale]({PLOTS['scale']})", ""]
    rows = [
        [
            f"{r['grants']:,}",
            f"{r['rps']:.0f}",
            f"{1e6 / r['cpu_us']:.0f}" if r.get("cpu_us") else "—",
            f"{r.get('cpu_us', 0):.1f}",
            f"{r['p99_ms']:.2f}",
            f"{r['rss_mib']:.1f}",
            f"{r.get('startup_s', 0):.1f}",
            str(r.get("failed", 0)),
        ]
        for r in scale.get("throughput") or ()
    ]
    lines += _table(
        ["grants", "req/s", "req/s/core", "CPU µs/req", "p99 ms", "RSS MiB", "load s", "failed"],
        rows,
    )
    lines += [
        "",
        f"Proxy RSS per 1k grants (least-squares slope): "
        f"**{scale.get('rss_mib_per_1k_grants', 0):.2f} MiB**.",
        "",
    ]
    reload = scale.get("reload")
    if reload:
        under = reload.get("under_reload") or {}
        base = reload.get("baseline") or {}
        served = reload.get("write_to_served_ms") or []
        lines += [
            f"### Reload of {reload['grants']:,} grants under load (standalone resources dir)",
            "",
            f"wrk with {reload['connections']} connections for {reload['duration_s']:.0f} s "
            f"while the resources were rewritten {reload['reloads']} times.",
            "",
        ]
        lines += _table(
            ["what", "value"],
            [
                ["requests during the reloads", f"{under.get('requests', 0):,}"],
                ["failed (non-2xx + socket errors)", f"**{reload.get('failed_requests')}**"],
                ["every reload happened under load", str(reload.get("all_reloads_under_load"))],
                [
                    "p99 / max latency, with reloads",
                    f"{under.get('p99_ms', 0):.1f} / {under.get('max_ms', 0):.0f} ms",
                ],
                [
                    "p99 / max latency, no reload",
                    f"{base.get('p99_ms', 0):.1f} / {base.get('max_ms', 0):.0f} ms",
                ],
                [
                    "standalone reload in-process (YAML load + compile), wall / CPU",
                    f"{reload['reload_wall_ms']:.0f} / {reload['reload_cpu_ms']:.0f} ms",
                ],
                [
                    "file rewrite → new policy served (includes the 1 s poll)",
                    ", ".join(f"{ms:.0f}" for ms in served) + " ms",
                ],
                ["proxy start with these resources", f"{reload.get('startup_s', 0):.1f} s"],
            ],
        )
        lines.append("")
    return lines


def _revocation_section(results: JSON) -> list[str]:
    lines = ["## Revocation latency (real kube-apiserver)", ""]
    revocation = part(results, "revocation")
    if not revocation:
        return lines + _not_measured(results, "revocation")
    lines += [
        "Controller + `nhigate proxy --kube` + backend on 127.0.0.1; time from the API call "
        "returning until the proxy's first 403, polled every "
        f"{revocation.get('poll_ms', 5):.0f} ms.",
        "",
        f"![revocation CDF]({PLOTS['revocation']})",
        "",
    ]
    rows = []
    for key, label in _revocation_scenarios(revocation):
        r = revocation.get(key) or {}
        rows.append(
            [
                label,
                str(r.get("trials", 0)),
                _fmt(r.get("p50_ms"), ".0f"),
                _fmt(r.get("p90_ms"), ".0f"),
                _fmt(r.get("p99_ms"), ".0f"),
                _fmt(r.get("max_ms"), ".0f"),
            ]
        )
    lines += _table(["scenario", "trials", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows)
    return [*lines, ""]


def _reconcile_section(results: JSON) -> list[str]:
    lines = ["## Reconcile throughput (real kube-apiserver)", ""]
    reconcile = part(results, "reconcile")
    if not reconcile:
        return lines + _not_measured(results, "reconcile")
    lines += [
        f"{reconcile['grants']:,} RouteGrants applied at once via "
        f"{reconcile.get('via', 'kubectl')}, one local "
        "proxy replica reporting its policy version through a Lease.",
        "",
    ]
    lines += _table(
        ["what", "value"],
        [
            ["every apply call returned", f"{reconcile['apply_s']:.1f} s"],
            [
                "all Accepted",
                f"{reconcile['all_accepted_s']:.1f} s"
                if reconcile.get("all_accepted_s") is not None
                else f"not within the bound ({reconcile.get('accepted_reached')})",
            ],
            [
                "all Enforced",
                f"{reconcile['all_enforced_s']:.1f} s"
                if reconcile.get("all_enforced_s") is not None
                else f"not within the bound ({reconcile.get('enforced_reached')})",
            ],
            ["controller CPU", f"{reconcile['controller_cpu_s']:.1f} s"],
            ["controller peak RSS (VmHWM)", f"{reconcile['controller_peak_rss_mib']:.0f} MiB"],
            ["proxy peak RSS", f"{reconcile.get('proxy_peak_rss_mib', 0):.0f} MiB"],
            [
                "policy ConfigMap size",
                f"{reconcile.get('policy_configmap_bytes', 0) / 1024:.0f} KiB",
            ],
        ],
    )
    return [*lines, ""]


def _mcp_section(results: JSON) -> list[str]:
    lines = ["## MCP decisions", ""]
    mcp = part(results, "mcp")
    if not mcp:
        return lines + _not_measured(results, "mcp")
    decision = mcp.get("decision") or {}
    settings = mcp.get("settings") or {}
    lines += [
        "In process: `decide_request()` for a plain request "
        f"{_fmt(decision.get('plain_decide_us'), '.2f')} µs vs reading the MCP body and "
        f"deciding the tool {_fmt(decision.get('mcp_parse_and_decide_us'), '.2f')} µs "
        f"(+{_fmt(decision.get('added_us'), '.2f')} µs per `tools/call`).",
        "",
        f"Through one proxy process, {settings.get('connections', '?')} keep-alive connections, "
        f"{settings.get('duration_s', '?')} s per case, median run by CPU "
        f"(load {_fmt(mcp.get('load_average'), '.1f')}):",
        "",
    ]
    rows = [
        [
            name,
            _fmt(r.get("rps"), ".0f"),
            _fmt(r.get("p50_ms"), ".2f"),
            _fmt(r.get("p99_ms"), ".2f"),
            _fmt(r.get("cpu_us"), ".1f"),
            _fmt(r.get("added_cpu_us"), "+.1f") if r.get("added_cpu_us") is not None else "",
        ]
        for name, r in (mcp.get("proxy") or {}).items()
    ]
    lines += _table(["case", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "vs plain"], rows)
    return [*lines, ""]


def _websocket_section(results: JSON) -> list[str]:
    lines = ["## WebSocket relay", ""]
    websocket = part(results, "websocket")
    if not websocket:
        return lines + _not_measured(results, "websocket")
    lines += [
        "aiohttp's WebSocket echo server (CPU 1) and client; `relay` is a bare uvloop TCP relay "
        "and nhigate the proxy, both on CPU 0. One echo is one message each way; CPU from "
        "/proc, per relayed message = half the proxy's CPU per echo.",
        "",
    ]
    rows = [
        [
            f"{int(size):,} B",
            case,
            f"{r['echoes_per_s']:,.0f}",
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.1f}",
            f"{r['backend_cpu_us_per_echo']:.1f}",
            _fmt(r.get("proxy_cpu_us_per_message")),
            _fmt(r.get("echoes_per_s_ratio"), ".2f"),
            _fmt(r.get("cpu_vs_relay"), ".2f"),
        ]
        for size, per_size in (websocket.get("results") or {}).items()
        if size != "idle"
        for case, r in per_size.items()
    ]
    header = ["message", "case", "echoes/s", "p50 / p99 ms", "backend CPU µs/echo"]
    header += ["proxy CPU µs/message", "echoes/s vs direct", "proxy CPU vs bare relay"]
    lines += _table(header, rows)
    idle = (websocket.get("results") or {}).get("idle")
    if idle:
        lines += [
            "",
            f"{idle['connections']:,} idle connections held open through nhigate: "
            f"**{idle['kib_per_connection']:.1f} KiB** of proxy RSS each "
            f"({idle['rss_before_mib']:.1f} → {idle['rss_after_mib']:.1f} MiB), "
            f"{idle['idle_cpu_percent']:.2f}% of a core while idle.",
        ]
    return [*lines, ""]


def _grpc_section(results: JSON) -> list[str]:
    lines = ["## gRPC unary calls", ""]
    grpc = part(results, "grpc")
    if not grpc:
        return lines + _not_measured(results, "grpc")
    settings = grpc.get("settings") or {}
    lines += [
        "grpcio's asyncio Echo server (CPU 1) and client (one channel); nhigate on CPU 0 with "
        "`--upstream-protocol http2` (HTTP/2 in, h2c out). "
        f"{settings.get('size', '?')}-byte payload, {settings.get('duration_s', '?')} s per "
        "run, median run by CPU; CPU from /proc.",
        "",
    ]
    rows = [
        [
            case,
            f"{name} ({r['concurrency']})",
            f"{r['calls_per_s']:,.0f}",
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.1f}",
            str(r.get("failed", 0)),
            f"{r['backend_cpu_us_per_call']:.1f}",
            _fmt(r.get("proxy_cpu_us_per_call") if case != "direct" else None),
            _fmt(r.get("proxy_calls_per_core"), ",.0f"),
            _fmt(r.get("calls_per_s_ratio"), ".2f"),
        ]
        for case, per_load in (grpc.get("results") or {}).items()
        for name, r in per_load.items()
    ]
    header = ["case", "load", "calls/s", "p50 / p99 ms", "failed", "backend CPU µs/call"]
    header += ["proxy CPU µs/call", "proxy calls/core", "calls/s vs direct"]
    lines += _table(header, rows)
    return [*lines, ""]


def _token_section(results: JSON) -> list[str]:
    lines = ["## Token verification", ""]
    token = part(results, "token")
    if not token:
        return lines + _not_measured(results, "token")
    columns = token.get("columns") or []
    lines += ["µs per token on one core (process CPU time); cached = verified-token cache hit.", ""]
    rows = [[row["alg"], *(f"{row[c]:.1f}" for c in columns)] for row in token.get("rows") or ()]
    lines += _table(["alg", *columns], rows)
    return [*lines, ""]


def _commands(results: JSON) -> list[str]:
    lines = ["## Exact commands", "", "```"]
    lines.append(results.get("command", ""))
    for name, entry in (results.get("parts") or {}).items():
        status = entry.get("status")
        took = entry.get("seconds")
        load = ""
        if entry.get("load_before") and entry.get("load_after"):
            load = f", load {entry['load_before'][0]:.1f} -> {entry['load_after'][0]:.1f}"
        lines.append(
            f"# {name}: {status} in {took:.0f} s{load}" if took is not None else f"# {name}"
        )
        lines.append(" ".join(entry.get("command") or []))
    lines += ["```", ""]
    return lines


def render_markdown(results: JSON) -> str:
    """The whole report as markdown (plots referenced by their file names in PLOTS)."""
    lines = [
        "# nhigate benchmark report",
        "",
        f"Run {results.get('started', '?')} → {results.get('finished', '?')}"
        f"{' (--quick: reduced trials and durations)' if results.get('quick') else ''}; "
        f"repeats: {results.get('repeat', '?')}.",
        "",
        "## Targets (issues 7 and 16)",
        "",
    ]
    rows = [
        [t.name, t.target, t.measured, {True: "met", False: "**missed**", None: "—"}[t.met]]
        for t in targets(results)
    ]
    lines += _table(["target", "goal", "measured", ""], rows)
    lines.append("")
    lines += _machine(results)
    lines += _proxy_section(results)
    lines += _instructions_section(results)
    lines += _policy_section(results)
    lines += _revocation_section(results)
    lines += _reconcile_section(results)
    lines += _token_section(results)
    lines += _websocket_section(results)
    lines += _mcp_section(results)
    lines += _grpc_section(results)
    lines += _commands(results)
    return "\n".join(lines)


def write_report(results: JSON, out: Path) -> list[Path]:
    """Write report.md and every plot that has data into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plotters: dict[str, Callable[[JSON, Path], bool]] = {
        "overhead": plot_overhead,
        "decide": plot_decide,
        "revocation": plot_revocation,
        "scale": plot_scale,
    }
    for key, plot in plotters.items():
        path = out / PLOTS[key]
        if plot(results, path):
            written.append(path)
    report = out / "report.md"
    report.write_text(render_markdown(results))
    written.append(report)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", type=Path, help="results.json from bench/run.py")
    parser.add_argument("--out", type=Path, help="output directory (default: next to results)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    for path in write_report(results, args.out or args.results.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
