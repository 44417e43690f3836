"""One JSON line per decision, allow and deny, written without blocking the event loop.

Records are serialised with orjson on the loop (~1 us), batched in memory and
handed to one writer thread every `flush_interval` seconds or when the batch
passes `flush_bytes`. The thread does the (possibly blocking) write to stdout
or the audit file, so a slow disk or a full pipe never stalls request handling.
If the writer falls `max_backlog_bytes` behind, new batches are dropped and
counted (`dropped`), and an error is logged once per burst: the alternative,
blocking every request on the audit sink, would turn a slow log into an outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson

from nhigate.policy.model import Identity

log = logging.getLogger(__name__)

_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE

_identity_cache: list[tuple[Identity | None, dict[str, Any] | None]] = [(None, None)]


def _identity_record(identity: Identity | None) -> dict[str, Any] | None:
    # Identities are immutable and a cached token yields the same object on every hit:
    # remember the last one's record (orjson only reads it).
    if identity is None:
        return None
    cached, record = _identity_cache[0]
    if cached is not identity or record is None:
        record = {"issuer": identity.issuer, "subject": identity.subject, "kind": identity.kind}
        if identity.actors:  # the RFC 8693 chain, current actor first
            record["actors"] = list(identity.actors)
        _identity_cache[0] = (identity, record)
    return record


def audit_line(
    time: float,
    request_id: str,
    decision: str,
    reason: str,
    method: str,
    path: str,
    upstream: str,
    status: int,
    duration_ms: float,
    policy_version: str | None,
    identity: Identity | None = None,
    grant: str | None = None,
    detail: str | None = None,
    tenant: str | None = None,
    peer: str | None = None,
    *,
    mcp: dict[str, Any] | None = None,
    websocket: dict[str, Any] | None = None,
    grpc: tuple[str, str] | None = None,
    grpc_status: int | None = None,
) -> bytes:
    """One audit record (the fields of `AuditEvent`, in its order) as one JSON line."""
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(time, UTC),
        "request_id": request_id,
        "decision": decision,
        "reason": reason,
        "identity": _identity_record(identity),
        "grant": grant,
        "method": method,
        "path": path,
        "upstream": upstream,
        "status": status,
        "duration_ms": round(duration_ms * 1000.0) / 1000.0,
        "policy_version": policy_version,
    }
    if detail is not None:
        record["detail"] = detail
    if tenant is not None:
        record["tenant"] = tenant
    if peer is not None:
        record["peer"] = peer
    if mcp is not None:
        record["mcp"] = mcp
    if websocket is not None:
        record["websocket"] = websocket
    if grpc is not None:  # an HTTP/2 gRPC call: which method, and the status it ended with
        record["grpc_service"], record["grpc_method"] = grpc
        if grpc_status is not None:
            record["grpc_status"] = grpc_status
    return orjson.dumps(record, option=_OPTIONS)


@dataclass(slots=True)
class AuditEvent:
    """The fields of one audit record (docs/security.md invariant 6)."""

    time: float
    request_id: str
    decision: str
    reason: str
    method: str
    path: str
    upstream: str
    status: int
    duration_ms: float
    policy_version: str | None
    identity: Identity | None = None
    grant: str | None = None
    detail: str | None = None
    tenant: str | None = None
    peer: str | None = None
    mcp: dict[str, Any] | None = None
    """On MCP endpoints: the JSON-RPC method and the tool, resource or prompt it names."""
    websocket: dict[str, Any] | None = None
    """On WebSocket connections: `event` (open/close); at close, who ended it and the bytes
    each way (docs/proxy.md#websocket)."""

    def to_json(self) -> bytes:
        """The record as one JSON line."""
        return audit_line(
            self.time,
            self.request_id,
            self.decision,
            self.reason,
            self.method,
            self.path,
            self.upstream,
            self.status,
            self.duration_ms,
            self.policy_version,
            self.identity,
            self.grant,
            self.detail,
            self.tenant,
            self.peer,
            mcp=self.mcp,
            websocket=self.websocket,
        )


class AuditLog:
    """Buffered audit sink: `write()` is cheap and never blocks; `close()` flushes everything."""

    def __init__(
        self,
        sink: BinaryIO,
        *,
        flush_interval: float = 0.05,
        flush_bytes: int = 64 * 1024,
        max_backlog_bytes: int = 64 * 1024 * 1024,
        close_sink: bool = False,
    ) -> None:
        self._sink = sink
        self._close_sink = close_sink
        self._flush_interval = flush_interval
        self._flush_bytes = flush_bytes
        self._max_backlog = max_backlog_bytes
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.records = 0
        self.dropped = 0
        self._warned = False

    @classmethod
    def open(cls, target: str) -> AuditLog:
        """`-` for stdout, else a file path opened for appending."""
        if target == "-":
            return cls(sys.stdout.buffer)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        return cls(os.fdopen(fd, "ab", buffering=0), close_sink=True)

    def start(self) -> None:
        """Start the writer thread (call from the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nhigate-audit", daemon=True)
        self._thread.start()

    def write(self, event: AuditEvent) -> None:
        """Queue one record."""
        self.write_line(event.to_json())

    def write_line(self, line: bytes) -> None:
        """Queue one record already serialised by `audit_line`."""
        self._batch.append(line)
        self._batch_bytes += len(line)
        self.records += 1
        if self._batch_bytes >= self._flush_bytes:
            self.flush()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Hand the current batch to the writer thread."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        data = b"".join(self._batch)
        count = len(self._batch)
        self._batch.clear()
        self._batch_bytes = 0
        if self._thread is None:
            self._write_now(data)
            return
        with self._backlog_lock:
            if self._backlog + len(data) > self._max_backlog:
                self.dropped += count
                if not self._warned:
                    self._warned = True
                    log.error("audit sink is %d bytes behind: dropping records", self._backlog)
                return
            self._backlog += len(data)
            self._warned = False
        self._queue.put(data)

    @property
    def backlog_bytes(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        with self._backlog_lock:
            return self._backlog

    def _write_now(self, data: bytes) -> None:
        try:
            self._sink.write(data)
            self._sink.flush()
        except (OSError, ValueError):
            log.exception("audit sink write failed")

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            self._write_now(data)
            with self._backlog_lock:
                self._backlog -= len(data)

    async def close(self) -> None:
        """Flush every queued record and stop the writer thread."""
        self.flush()
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)
            self._thread = None
        if self._close_sink:
            self._sink.close()
