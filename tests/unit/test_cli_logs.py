"""Every nhigate process logs one JSON object per line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from nhigate.cli.logs import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiohttp.server", "kopf.objects")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.mark.usefixtures("restore_logging")
def test_log_lines_are_json_even_with_quotes_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info")
    log = logging.getLogger("nhigate.test")
    log.info("policy %s applied to 'ns/api'", "sha256:abc")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("sync failed")
    log.debug("not shown at INFO")
    lines = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["msg"] for r in records] == ["policy sha256:abc applied to 'ns/api'", "sync failed"]
    assert records[0]["level"] == "INFO"
    assert records[0]["logger"] == "nhigate.test"
    assert "RuntimeError: boom" in records[1]["error"]


@pytest.mark.usefixtures("restore_logging")
def test_parser_refusal_tracebacks_are_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    # The proxy audits refused requests itself; aiohttp's traceback per refusal is a log flood.
    setup_logging("info")
    logging.getLogger("aiohttp.server").error("Error handling request", exc_info=False)
    assert capsys.readouterr().err == ""
