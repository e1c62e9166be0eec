# actors/log.py's reader: a run's JSON-lines logs merged into one timeline.
from __future__ import annotations

import json

from actors import log as log_mod
from actors.log import EventLog, read_json_events


def _write(path, events, tail: str = "") -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def test_logs_merge_by_time_and_a_torn_last_line_is_dropped(tmp_path):
    """A process SIGKILLed mid-write leaves half a line at the end of its file: the
    complete events before it are kept, and the files merge by (ts_ns, pid, seq)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    _write(logs / "ksmd-10.jsonl", [{"event": "a", "pid": 10, "actor": "ksmd", "ts_ns": 1, "seq": 0},
                                    {"event": "c", "pid": 10, "actor": "ksmd", "ts_ns": 3, "seq": 1}],
           tail='{"event": "torn", "pid": 10, "ts')
    _write(logs / "fault-11.jsonl", [{"event": "b", "pid": 11, "actor": "fault", "ts_ns": 2, "seq": 0},
                                     {"event": "trace_string", "pid": 11, "id": 1, "s": "mmap_lock"}])
    events, strings, actors = read_json_events(str(tmp_path))
    assert [e["event"] for e in events] == ["a", "b", "c"]
    assert strings == {11: {1: "mmap_lock"}} and actors == {10: "ksmd", 11: "fault"}


def _lines(log: EventLog) -> list[str]:
    with open(log.path, encoding="utf-8") as f:
        return [json.loads(line)["event"] for line in f if line.strip()]


def test_a_buffering_log_writes_every_flush_every_events_and_at_each_flush(tmp_path, monkeypatch):
    """flush_every is what it says (structlog's WriteLogger flushed every line, a write(2)
    per event): nothing reaches the file between flushes, everything at one."""
    monkeypatch.setattr(log_mod, "FLUSH_WITHIN_NS", 1 << 62)
    log = EventLog(str(tmp_path), "ksmd", "r", 7, flush_every=3)
    try:
        log("a")
        log("b")
        assert _lines(log) == []
        log("c")
        assert _lines(log) == ["a", "b", "c"]
        log("d")
        assert _lines(log) == ["a", "b", "c"]
        log.flush()
        assert _lines(log) == ["a", "b", "c", "d"]
    finally:
        log.close()


def test_no_event_stays_buffered_longer_than_flush_within(tmp_path, monkeypatch):
    """A process that buffers (ksmd) and is then killed, or loops in the kernel without
    reaching a flush point, loses at most its last FLUSH_WITHIN_NS of events."""
    clock = [0]
    monkeypatch.setattr(log_mod.time, "monotonic_ns", lambda: clock[0])
    log = EventLog(str(tmp_path), "ksmd", "r", 7, flush_every=1 << 20)
    try:
        log("a")
        assert _lines(log) == []
        clock[0] = log_mod.FLUSH_WITHIN_NS
        log("b")
        assert _lines(log) == ["a", "b"]
        log("c")
        assert _lines(log) == ["a", "b"]
    finally:
        log.close()
    assert _lines(log) == ["a", "b", "c"]


def test_events_turned_off_are_not_written_and_the_rest_are(tmp_path):
    log = EventLog(str(tmp_path), "ksmd", "r", 7, off=frozenset({"ksm_merge_one_page"}))
    try:
        log("ksm_start_scan", seqnr=1)
        log("ksm_merge_one_page", pfn=3)
        log("report", kind="oops")
    finally:
        log.close()
    assert _lines(log) == ["ksm_start_scan", "report"]
