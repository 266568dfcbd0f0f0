"""Opinion monitoring: classify timestamped texts as they come and watch, per topic and time
window, the share of one label (negative, by default); alert when it is high or jumps.

    tunelab monitor --run runs/sst2-lora --input posts.jsonl --topic-column brand --window 1h
    tail -f posts.jsonl | tunelab monitor --run runs/sst2-lora --input - --follow

    >>> m = Monitor(tunelab.load("runs/sst2-lora"), window="1d", min_count=50)
    >>> m.feed([{"time": "2024-05-01T09:30:00Z", "text": "the update broke everything"}])
    >>> m.finish(); m.series(); m.alerts

Input rows carry a time, a text and optionally a topic. Times are ISO 8601
(`2024-05-01T10:00:00`, with `Z` or `+02:00`, or without a zone: then read as UTC) or epoch
seconds (a number, or a string of digits). Windows are aligned to the Unix epoch in UTC: `1h`
windows start on the hour, `1d` at 00:00 UTC, `15min` at :00, :15, :30 and :45. The topic is a
column of the input, or the label a second (topic) run gives the text, or the single topic `all`.

Alerts, per topic and window:
- `threshold`: the negative share is >= `threshold` in a window with >= `min_count` texts;
- `change`: the share moved by >= `change` (up or down) from the window just before, of the
  same topic, both windows holding >= `min_count` texts.
A window's alerts are decided when it closes: when a text from a later window arrives (texts
are expected in time order, as a stream delivers them) or the input ends. A text for a window
that has already closed is "late": it is counted in the series all the same, and its window is
checked again at the end of the input (alerts already raised stay raised). Input in another
order (say grouped by topic) thus still gets its alerts, only at the end.

Memory is bounded by windows x topics (label counts per cell), never by the number of texts:
texts are classified in micro-batches (`BATCH` texts, or whatever arrived within `MAX_WAIT_S`)
and dropped.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from tunelab.data.readers import Row
from tunelab.errors import ConfigError, DataError

UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 604800}
BATCH = 64
"""Texts per classification call."""
MAX_WAIT_S = 2.0
"""A slow stream is classified at least this often (seconds after the first waiting text)."""
MAX_EPOCH = 253402300799
"""9999-12-31T23:59:59Z: epoch seconds beyond it are refused (most likely milliseconds)."""
ALL_TOPICS = "all"
ALERT_COLUMNS = ("window_start", "window_end", "topic", "reason", "count", "negative",
                 "negative_share", "previous_share", "message")


@dataclass
class MonitorSettings:
    window: str = "1h"
    """Window length: a number and a unit, s, min, h, d or w (15min, 1h, 1d)."""
    time_column: str = "time"
    text_column: str = "text"
    topic_column: str | None = None
    """Column holding each text's topic; unset: the topic run's label, else one topic `all`."""
    negative_label: str = "negative"
    """The label whose share is watched; any label of the run (a topic run's, too)."""
    threshold: float = 0.4
    """Alert when a window's share of the label reaches this (with min_count texts)."""
    change: float = 0.2
    """Alert when the share moves this much from the topic's previous window."""
    min_count: int = 20
    """Windows with fewer texts raise no alert: their shares are noise."""
    skip_bad: bool = False
    """Skip rows with a bad time, text or topic (counted and reported) instead of stopping."""

    def __post_init__(self):
        parse_window(self.window)
        for name in ("threshold", "change"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"--{name} must be in (0, 1], got {getattr(self, name)}")
        if self.min_count < 1:
            raise ConfigError(f"--min-count must be at least 1, got {self.min_count}")


@dataclass
class Alert:
    window_start: str
    """ISO 8601, UTC."""
    window_end: str
    topic: str
    reason: str
    """threshold or change."""
    count: int
    negative: int
    negative_share: float
    previous_share: float | None
    """The topic's share in the previous window (`change` alerts)."""
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_window(text: str) -> int:
    """Window length in seconds from `15min`, `1h`, `1d` ..."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]+)\s*", str(text).lower())
    if not match or match[2] not in UNITS or int(match[1]) < 1:
        raise ConfigError(f"--window {text!r}: expected a number and a unit like 15min, 1h or "
                          f"1d (units: {', '.join(UNITS)})")
    return int(match[1]) * UNITS[match[2]]


def parse_time(value) -> float:
    """Epoch seconds (UTC) of an ISO 8601 time or an epoch-seconds number; ValueError with the
    reason otherwise."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+(\.\d+)?\s*", value):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and 0 <= value <= MAX_EPOCH):
            hint = " (milliseconds? give seconds)" if value > MAX_EPOCH else ""
            raise ValueError(f"epoch seconds {value!r} out of range{hint}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("no time given" if value in (None, "") else
                         f"expected a time, got {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is neither ISO 8601 (2024-05-01T10:00:00Z) nor epoch "
                         "seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


# --------------------------------------------------------------------------------------------
# the monitor


class Monitor:
    """Counts per (window, topic) and label, fed batch by batch; alerts as windows close."""

    def __init__(self, predictor, *, topic_predictor=None, **settings):
        self.settings = s = MonitorSettings(**settings)
        self.step = parse_window(s.window)
        self.predictor, self.topic_predictor = predictor, topic_predictor
        self.labels = list(predictor.labels)
        if s.negative_label not in self.labels:
            raise ConfigError(f"--negative-label {s.negative_label!r} is not a label of the "
                              f"run; its labels: {', '.join(self.labels)}")
        if topic_predictor is not None and s.topic_column:
            raise ConfigError("give --topic-column or --topic-run, not both")
        self.negative = self.labels.index(s.negative_label)
        self.counts: dict[tuple[int, str], list[int]] = {}
        """(window start in epoch seconds, topic) -> texts per label."""
        self.alerts: list[Alert] = []
        self.texts = self.skipped = self.late = self.closed = 0
        self.problems: list[str] = []
        """The first skipped rows' problems (file:line column: reason)."""
        self._open: set[tuple[int, str]] = set()
        self._newest: int | None = None  # the latest window with a text
        self._closed_before: int | None = None  # windows starting before it are closed
        self._recheck: set[tuple[int, str]] = set()  # closed windows that got late texts
        self._raised: set[tuple[int, str, str]] = set()
        self._fed = 0

    def feed(self, rows: Iterable, source: str = "<rows>") -> list[Alert]:
        """Classify and count rows (dicts, or `Row`s that know their line), `BATCH` at a time;
        returns the alerts of the windows this closed. A plain dict's line is its position
        among all rows fed. Any iterable will do: only one batch of texts is held at once."""
        records = (r for r in (self._parse(row, source) for row in rows) if r is not None)
        raised = []
        while part := list(itertools.islice(records, BATCH)):
            texts = [text for _, text, _ in part]
            labels = [p["label"] for p in self.predictor.predict(texts)]
            topics = ([p["label"] for p in self.topic_predictor.predict(texts)]
                      if self.topic_predictor is not None else [t for _, _, t in part])
            for (window, _, _), label, topic in zip(part, labels, topics):
                self._count(window, topic, label)
            raised += self._close(self._newest)
        return raised

    def finish(self) -> list[Alert]:
        """The input ended: close every window, re-check those that got late texts."""
        due = self._open | self._recheck | {  # and the windows whose change compares to them
            (w + self.step, t) for w, t in self._recheck if (w + self.step, t) in self.counts}
        self.closed += len(self._open)
        self._open.clear()
        self._recheck.clear()
        raised = []
        for window, topic in sorted(due):
            raised += self._evaluate(window, topic)
        return raised

    def series(self) -> list[dict]:
        """One row per (window, topic) with texts, in time order: what series.csv holds."""
        out = []
        for (window, topic), counts in sorted(self.counts.items()):
            n = sum(counts)
            out.append({"window_start": iso(window), "window_end": iso(window + self.step),
                        "topic": topic, "count": n, "negative": counts[self.negative],
                        "negative_share": round(counts[self.negative] / n, 6),
                        **{f"n_{label}": c for label, c in zip(self.labels, counts)}})
        return out

    # -- internals ----------------------------------------------------------------------------
    def _parse(self, row, source: str) -> tuple[int, str, str] | None:
        """(window start, text, topic or None when the topic run decides) or None if skipped."""
        self._fed += 1
        values, line = (row.values, row.line) if isinstance(row, Row) else (row, self._fed)
        s = self.settings
        column = s.time_column
        try:
            if column not in values:
                raise ValueError(f"no such field; fields: {', '.join(map(str, values))}")
            seconds = parse_time(values[column])
            column = s.text_column
            text = values.get(column)
            if not isinstance(text, str):
                raise ValueError("no text" if text is None else
                                 f"expected text, got {type(text).__name__}")
            if not text.strip():
                raise ValueError("empty text")
            topic = None if self.topic_predictor is not None else ALL_TOPICS
            if s.topic_column:
                column = s.topic_column
                topic = values.get(column)
                topic = "" if topic is None else str(topic).strip()
                if not topic:
                    raise ValueError("empty topic")
        except ValueError as e:
            if not s.skip_bad:
                raise DataError(f"{e} (or pass --skip-bad to skip such rows)", file=source,
                                line=line, column=column) from None
            self.skipped += 1
            if len(self.problems) < 10:
                self.problems.append(str(DataError(str(e), file=source, line=line,
                                                   column=column)))
            return None
        return int(seconds // self.step) * self.step, text, topic

    def _count(self, window: int, topic: str, label: str) -> None:
        key = (window, topic)
        counts = self.counts.setdefault(key, [0] * len(self.labels))
        counts[self.labels.index(label)] += 1
        self.texts += 1
        self._newest = window if self._newest is None else max(self._newest, window)
        if self._closed_before is not None and window < self._closed_before:
            self.late += 1
            self._recheck.add(key)
        else:
            self._open.add(key)

    def _close(self, before: int | None) -> list[Alert]:
        """Close the open windows starting before `before` (None: all) and decide their alerts."""
        due = sorted(k for k in self._open if before is None or k[0] < before)
        self._open.difference_update(due)
        self.closed += len(due)
        if before is not None:
            self._closed_before = max(before, self._closed_before or before)
        raised = []
        for window, topic in due:
            raised += self._evaluate(window, topic)
        return raised

    def _evaluate(self, window: int, topic: str) -> list[Alert]:
        s = self.settings
        counts = self.counts[(window, topic)]
        n, neg = sum(counts), counts[self.negative]
        if n < s.min_count:
            return []
        share = neg / n
        name = f"{s.negative_label} share"
        found = []
        if share >= s.threshold:
            found.append(("threshold", None, f"{name} {share:.2f} >= {s.threshold:g}"))
        prev = self.counts.get((window - self.step, topic))
        if prev is not None and sum(prev) >= s.min_count:
            before = prev[self.negative] / sum(prev)
            if round(abs(share - before), 9) >= s.change:  # 0.6 - 0.4 is 0.19999999999999996
                found.append(("change", round(before, 6), f"{name} moved {before:.2f} -> "
                              f"{share:.2f} (change >= {s.change:g})"))
        raised = []
        for reason, previous, why in found:
            if (window, topic, reason) in self._raised:
                continue
            self._raised.add((window, topic, reason))
            raised.append(Alert(iso(window), iso(window + self.step), topic, reason, n, neg,
                                round(share, 6), previous,
                                f"ALERT {iso(window)} topic {topic!r}: {why} (n={n})"))
        self.alerts += raised
        return raised


# --------------------------------------------------------------------------------------------
# reading a stream


def read_stream(lines: Iterable[str], source: str = "<stdin>") -> Iterator[Row]:
    """Rows of JSON Lines or CSV (header first), parsed line by line as the lines arrive; the
    first non-blank line tells which (JSON lines start with `{`)."""
    numbered = enumerate(lines, start=1)
    head = []
    for number, text in numbered:
        head.append(text)
        if text.strip():
            break
    if not head or not head[-1].strip():
        return
    rest = itertools.chain(head, (text for _, text in numbered))
    if head[-1].lstrip().startswith("{"):
        yield from _stream_jsonl(rest, source)
    else:
        yield from _stream_csv(rest, source)


def _stream_jsonl(lines: Iterable[str], source: str) -> Iterator[Row]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (character {e.colno})", file=source,
                            line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object per line, got {type(value).__name__}",
                            file=source, line=number)
        yield Row(value, number)


def _stream_csv(lines: Iterable[str], source: str) -> Iterator[Row]:
    reader = csv.reader(lines)
    header, start = None, 1
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                if header is None:
                    header = [f.strip() for f in fields]
                else:
                    yield Row(dict(zip(header, fields)), start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"not valid CSV: {e}", file=source, line=start) from None


def micro_batches(rows: Iterable, size: int = BATCH,
                  max_wait: float = MAX_WAIT_S) -> Iterator[list]:
    """Lists of up to `size` rows; a list is handed out early once `max_wait` seconds passed
    since its first row, so a trickling stream is still classified promptly. Rows are read in
    a thread (a blocking read of stdin cannot time out); its errors are raised here, after the
    rows read before them, as is Ctrl-C while waiting."""
    pipe: queue.Queue = queue.Queue(maxsize=4 * size)
    done, stop = object(), threading.Event()

    def pump():
        try:
            for row in rows:
                while not stop.is_set():
                    try:
                        pipe.put(row, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pipe.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            pipe.put(e)

    threading.Thread(target=pump, daemon=True, name="monitor-reader").start()
    batch, deadline = [], None
    try:
        while True:
            try:
                item = pipe.get(timeout=None if deadline is None
                                else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                yield batch
                batch, deadline = [], None
                continue
            except KeyboardInterrupt as e:  # Ctrl-C while waiting for the stream
                item = e
            if item is done:
                break
            if isinstance(item, BaseException):
                if batch:  # what was read before the error or interrupt still counts
                    yield batch
                raise item
            batch.append(item)
            deadline = deadline or time.monotonic() + max_wait
            if len(batch) >= size:
                yield batch
                batch, deadline = [], None
        if batch:
            yield batch
    finally:
        stop.set()


def run(monitor: Monitor, rows: Iterable, out, *, source: str, follow: bool = False,
        refresh_s: float = 30.0, max_wait: float = MAX_WAIT_S, emit=print) -> None:
    """Feed `rows` through the monitor and write the report to `out`. follow: `emit` each alert
    as it is raised and rewrite the report (at most every `refresh_s`) as windows close, so a
    long-running stream always has a current one. Ctrl-C ends the stream: the report of what
    was read is written, then the interrupt goes on."""
    from tunelab.monitor_report import write_report

    last_write, closed = time.monotonic(), monitor.closed
    try:
        for batch in micro_batches(rows, BATCH, max_wait):
            alerts = monitor.feed(batch, source)
            if follow:
                for alert in alerts:
                    emit(alert.message)
                if monitor.closed > closed and time.monotonic() - last_write >= refresh_s:
                    write_report(monitor, out, source)
                    last_write, closed = time.monotonic(), monitor.closed
    except KeyboardInterrupt:
        write_report(monitor, out, source, final=True)
        raise
    for alert in monitor.finish():
        if follow:
            emit(alert.message)
    write_report(monitor, out, source, final=True)
