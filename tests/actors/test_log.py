# actors/log.py's reader: a run's JSON-lines logs merged into one timeline.
from __future__ import annotations

import json

from actors.log import read_json_events


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
