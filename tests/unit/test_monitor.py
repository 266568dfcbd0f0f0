"""The opinion monitor on synthetic streams with a fake predictor: windows, counts and alerts
are exact; bad rows are named by file:line and column; streams are read line by line."""
import csv
import io
import json
import time

import pytest

from tunelab.data.readers import read_rows
from tunelab.errors import ConfigError, DataError
from tunelab.monitor import (BATCH, Monitor, micro_batches, parse_time, parse_window,
                             read_stream, run)
from tunelab.monitor_report import write_report

T0 = 1714557600  # 2024-05-01T10:00:00Z


class KeywordPredictor:
    """'bad' in a text -> negative, else positive; remembers every call's size."""

    labels = ["negative", "positive"]

    def __init__(self, word="bad", labels=None):
        self.word, self.calls = word, []
        if labels:
            self.labels = labels

    def predict(self, texts):
        self.calls.append(len(texts))
        hit, miss = self.labels[0], self.labels[1]
        return [{"label": hit if self.word in t else miss} for t in texts]


def rows_for(window_start, topic, n, negative, step=3600):
    """n rows spread over one window, the first `negative` of them negative."""
    return [{"time": window_start + i * step // n, "text": "bad" if i < negative else "good",
             "topic": topic} for i in range(n)]


def test_parse_window_and_time():
    assert [parse_window(w) for w in ("30s", "15min", "1h", "1d", "2w")] == [
        30, 900, 3600, 86400, 1209600]
    for bad in ("1x", "h", "0h", "1.5h", ""):
        with pytest.raises(ConfigError, match="15min, 1h or 1d"):
            parse_window(bad)
    same = ["2024-05-01T10:00:00Z", "2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00",
            "2024-05-01 10:00:00", T0, float(T0), str(T0), f" {T0}.0 "]
    assert {parse_time(v) for v in same} == {float(T0)}
    assert parse_time("2024-05-01T10:00:00.250Z") == T0 + 0.25
    with pytest.raises(ValueError, match="milliseconds"):
        parse_time(T0 * 1000)
    for bad, reason in (("yesterday", "ISO 8601"), ("", "no time"), (None, "no time"),
                        (True, "got bool"), ([1], "got list")):
        with pytest.raises(ValueError, match=reason):
            parse_time(bad)


def test_windows_and_counts_are_exact():
    monitor = Monitor(KeywordPredictor(), window="15min", topic_column="topic")
    rows = [
        {"time": "2024-05-01T10:00:00Z", "text": "bad", "topic": "a"},
        {"time": "2024-05-01T10:14:59.9Z", "text": "good", "topic": "a"},  # same window
        {"time": "2024-05-01T12:15:00+02:00", "text": "bad", "topic": "a"},  # 10:15 UTC
        {"time": T0 + 15 * 60 + 1, "text": "good", "topic": "b"},
        {"time": "2024-05-01T10:16:00", "text": "bad bad", "topic": " b "},  # naive = UTC
        {"time": T0 + 3 * 3600, "text": "good", "topic": "a"},  # a gap: 13:00
    ]
    monitor.feed(rows)
    monitor.finish()
    assert monitor.series() == [
        {"window_start": "2024-05-01T10:00:00+00:00", "window_end": "2024-05-01T10:15:00+00:00",
         "topic": "a", "count": 2, "negative": 1, "negative_share": 0.5,
         "n_negative": 1, "n_positive": 1},
        {"window_start": "2024-05-01T10:15:00+00:00", "window_end": "2024-05-01T10:30:00+00:00",
         "topic": "a", "count": 1, "negative": 1, "negative_share": 1.0,
         "n_negative": 1, "n_positive": 0},
        {"window_start": "2024-05-01T10:15:00+00:00", "window_end": "2024-05-01T10:30:00+00:00",
         "topic": "b", "count": 2, "negative": 1, "negative_share": 0.5,
         "n_negative": 1, "n_positive": 1},
        {"window_start": "2024-05-01T13:00:00+00:00", "window_end": "2024-05-01T13:15:00+00:00",
         "topic": "a", "count": 1, "negative": 0, "negative_share": 0.0,
         "n_negative": 0, "n_positive": 1},
    ]
    assert (monitor.texts, monitor.late, monitor.skipped) == (6, 0, 0)
    assert monitor.alerts == []  # every window is under min_count


def test_classification_runs_in_micro_batches_and_memory_is_per_cell():
    predictor = KeywordPredictor()
    monitor = Monitor(predictor, window="1h")
    rows = [r for h in range(3) for r in rows_for(T0 + h * 3600, "x", 100, 10)]
    monitor.feed(rows)
    assert predictor.calls == [BATCH] * (300 // BATCH) + [300 % BATCH]
    assert list(monitor.counts.values()) == [[10, 90]] * 3  # texts are not kept
    assert {r["topic"] for r in monitor.series()} == {"all"}


def test_threshold_and_change_alerts():
    monitor = Monitor(KeywordPredictor(), window="1h", threshold=0.5, change=0.2, min_count=10,
                      topic_column="topic")
    stream = (rows_for(T0, "a", 10, 4) + rows_for(T0, "b", 9, 9)  # b: under min_count
              + rows_for(T0 + 3600, "a", 10, 6) + rows_for(T0 + 3600, "b", 20, 4)
              + rows_for(T0 + 7200, "a", 20, 10) + rows_for(T0 + 7200, "b", 20, 10))
    first = monitor.feed(stream[:19])  # hour 10 only: nothing closed yet
    assert first == []
    second = monitor.feed(stream[19:49])  # hour 11 arrives: hour 10 closes (no alert there)
    assert second == []
    third = monitor.feed(stream[49:])  # hour 12 arrives: hour 11 closes
    assert [(a.window_start[11:16], a.topic, a.reason) for a in third] == [
        ("11:00", "a", "threshold"), ("11:00", "a", "change")]
    assert (third[1].previous_share, third[1].negative_share, third[1].count) == (0.4, 0.6, 10)
    last = monitor.finish()  # hour 12 closes at the end of the input
    assert [(a.window_start[11:16], a.topic, a.reason, a.negative_share, a.previous_share)
            for a in last] == [("12:00", "a", "threshold", 0.5, None),
                               ("12:00", "b", "threshold", 0.5, None),
                               ("12:00", "b", "change", 0.5, 0.2)]
    assert monitor.alerts == third + last
    assert "topic 'b'" in last[2].message and "0.20 -> 0.50" in last[2].message
    # a(12:00) moved 0.6 -> 0.5: under --change; b(11:00) had no full window before it


def test_late_rows_are_counted_and_their_windows_rechecked():
    """Input grouped by topic, not by time: topic b arrives after a's windows closed."""
    stream = rows_for(T0, "a", 10, 0) + rows_for(T0 + 3600, "a", 10, 0)
    stream += rows_for(T0, "b", 10, 8) + rows_for(T0 + 3600, "b", 10, 1)
    monitor = Monitor(KeywordPredictor(), threshold=0.5, min_count=10, topic_column="topic")
    assert monitor.feed(stream[:20]) == [] and monitor.feed(stream[20:]) == []
    assert monitor.late == 10  # b's 10:00 rows: that window had closed
    alerts = monitor.finish()
    assert [(a.window_start[11:16], a.topic, a.reason) for a in alerts] == [
        ("10:00", "b", "threshold"), ("11:00", "b", "change")]
    in_order = Monitor(KeywordPredictor(), threshold=0.5, min_count=10, topic_column="topic")
    in_order.feed(sorted(stream, key=lambda r: r["time"]))
    in_order.finish()
    assert in_order.series() == monitor.series()
    assert [a.to_dict() for a in in_order.alerts] == [a.to_dict() for a in monitor.alerts]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="negative, positive"):
        Monitor(KeywordPredictor(), negative_label="neg")
    with pytest.raises(ConfigError, match="not both"):
        Monitor(KeywordPredictor(), topic_predictor=KeywordPredictor(), topic_column="t")
    for bad in ({"threshold": 0}, {"change": 1.5}, {"min_count": 0}, {"window": "1y"}):
        with pytest.raises(ConfigError):
            Monitor(KeywordPredictor(), **bad)


def test_topics_from_a_topic_run():
    topics = KeywordPredictor(word="goal", labels=["sports", "politics"])
    monitor = Monitor(KeywordPredictor(), topic_predictor=topics, min_count=1, threshold=1.0)
    monitor.feed([{"time": T0, "text": "a bad goal"}, {"time": T0 + 1, "text": "good vote"},
                  {"time": T0 + 2, "text": "bad vote"}])
    monitor.finish()
    assert [(r["topic"], r["count"], r["negative"]) for r in monitor.series()] == [
        ("politics", 2, 1), ("sports", 1, 1)]
    assert [(a.topic, a.reason) for a in monitor.alerts] == [("sports", "threshold")]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_bad_rows_name_file_line_and_column(tmp_path):
    rows = [{"time": "2024-05-01T10:00:00Z", "text": "good", "topic": "a"},
            {"time": "2024-05-01T10:05:00Z", "text": "bad", "topic": "a"},
            {"time": "5 past ten", "text": "good", "topic": "a"},
            {"time": "2024-05-01T10:07:00Z", "text": "", "topic": "a"},
            {"time": "2024-05-01T10:08:00Z", "text": "good", "topic": ""}]
    path = write_csv(tmp_path / "posts.csv", rows)
    with pytest.raises(DataError) as e:
        Monitor(KeywordPredictor(), topic_column="topic").feed(read_rows(path), str(path))
    assert f"{path}:4 column 'time'" in str(e.value) and "--skip-bad" in str(e.value)
    monitor = Monitor(KeywordPredictor(), topic_column="topic", skip_bad=True)
    monitor.feed(read_rows(path), str(path))
    assert (monitor.texts, monitor.skipped) == (2, 3)
    assert [p.split(": ")[0] for p in monitor.problems] == [
        f"{path}:4 column 'time'", f"{path}:5 column 'text'", f"{path}:6 column 'topic'"]
    with pytest.raises(DataError, match=r"<rows>:1 column 'time': no such field; fields: "
                                        r"when, text"):
        Monitor(KeywordPredictor()).feed([{"when": T0, "text": "x"}])


def test_read_stream_parses_jsonl_and_csv_line_by_line():
    lines = ["\n", '{"time": 1, "text": "a"}\n', "\n", '{"time": 2, "text": "b"}\n']
    assert [(r.values, r.line) for r in read_stream(iter(lines))] == [
        ({"time": 1, "text": "a"}, 2), ({"time": 2, "text": "b"}, 4)]
    with pytest.raises(DataError, match=r"<stdin>:2: invalid JSON"):
        list(read_stream(iter(['{"time": 1}\n', '{"time": \n'])))
    with pytest.raises(DataError, match=r"<stdin>:2: expected a JSON object"):
        list(read_stream(iter(['{"time": 1}\n', '[1]\n'])))
    text = 'time,text\n1,"two\nlines"\n\n2,plain\n'
    rows = list(read_stream(io.StringIO(text)))
    assert [(r.values, r.line) for r in rows] == [
        ({"time": "1", "text": "two\nlines"}, 2), ({"time": "2", "text": "plain"}, 5)]
    assert list(read_stream(iter(["\n", "  \n"]))) == []


def test_micro_batches_by_size_by_time_and_errors():
    assert [len(b) for b in micro_batches(range(25), size=10)] == [10, 10, 5]

    def trickle():
        yield from range(3)
        time.sleep(0.6)  # the stream pauses: the 3 waiting rows must not wait for more
        yield from range(3, 5)

    assert list(micro_batches(trickle(), size=10, max_wait=0.1)) == [[0, 1, 2], [3, 4]]

    def broken():
        yield 1
        raise DataError("boom", file="x.jsonl", line=2)

    with pytest.raises(DataError, match="x.jsonl:2: boom"):
        list(micro_batches(broken(), size=10))


def test_run_follows_alerts_and_writes_the_report(tmp_path):
    stream = rows_for(T0, "a", 10, 2) + rows_for(T0 + 3600, "a", 10, 7)
    stream += rows_for(T0 + 7200, "a", 10, 1)
    monitor = Monitor(KeywordPredictor(), threshold=0.6, min_count=10, topic_column="topic")
    printed = []

    def emit(message):  # with refresh_s=0 the report is current when a later alert comes
        printed.append(message)
        if len(printed) == 3:
            assert "12:00:00+00:00,a,10,7,0.7,7,3" in (tmp_path / "series.csv").read_text()

    run(monitor, iter(stream), tmp_path, source="s.jsonl", follow=True, refresh_s=0,
        max_wait=0.05, emit=emit)
    assert printed == [a.message for a in monitor.alerts] and len(printed) == 3
    assert [(a.window_start[11:16], a.reason) for a in monitor.alerts] == [
        ("11:00", "threshold"), ("11:00", "change"), ("12:00", "change")]
    with open(tmp_path / "series.csv", newline="") as f:
        series = list(csv.DictReader(f))
    assert [(r["window_start"], r["count"], r["negative"], r["negative_share"], r["n_positive"])
            for r in series] == [(r["window_start"], str(r["count"]), str(r["negative"]),
                                  str(r["negative_share"]), str(r["n_positive"]))
                                 for r in monitor.series()]
    with open(tmp_path / "alerts.csv", newline="") as f:
        assert [r["reason"] for r in csv.DictReader(f)] == ["threshold", "change", "change"]
    jsonl = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert jsonl == [a.to_dict() for a in monitor.alerts]
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "trend.png").stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "s.jsonl: 30 texts, 0 skipped rows" in report
    assert "| a | 30 | 10 | 0.333 | 3 | 0.700 (2024-05-01T11:00:00+00:00) | 3 |" in report
    assert "| 2024-05-01T11:00:00+00:00 | a | change | 0.700 | 0.200 | 10 |" in report
    assert "![negative share per topic](trend.png)" in report


def test_an_interrupted_stream_still_writes_its_report(tmp_path):
    def stream():
        yield from rows_for(T0, "a", 5, 1)
        raise KeyboardInterrupt

    monitor = Monitor(KeywordPredictor())
    with pytest.raises(KeyboardInterrupt):
        run(monitor, stream(), tmp_path, source="-", max_wait=0.05)
    assert "5 texts" in (tmp_path / "report.md").read_text()
    assert len((tmp_path / "series.csv").read_text().splitlines()) == 2


def test_an_empty_input_writes_an_empty_report(tmp_path):
    monitor = Monitor(KeywordPredictor())
    write_report(monitor, tmp_path, "empty.csv", final=True)
    assert (tmp_path / "series.csv").read_text().startswith("window_start,window_end,topic")
    assert (tmp_path / "alerts.csv").read_text().startswith("window_start,window_end,topic,")
    assert "## Alerts (0)" in (tmp_path / "report.md").read_text()
