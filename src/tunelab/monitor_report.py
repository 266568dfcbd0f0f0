"""The monitor's report: series.csv, alerts.csv/jsonl, trend.png and report.md, written
atomically from a `monitor.Monitor`'s counts (the streaming and alerting live in monitor.py)."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from tunelab.io import atomic_write_bytes, atomic_write_text
from tunelab.monitor import ALERT_COLUMNS, Monitor, iso, parse_time


def write_report(monitor: Monitor, out, source: str = "", final: bool = False) -> None:
    """series.csv, alerts.csv, alerts.jsonl, trend.png and report.md in `out`, each atomic.
    Before `final` the open windows are included as they stand."""
    out = Path(out)
    labels = [f"n_{label}" for label in monitor.labels]
    series = monitor.series()
    atomic_write_text(out / "series.csv", _csv_text(
        series, ["window_start", "window_end", "topic", "count", "negative", "negative_share",
                 *labels]))
    alerts = [a.to_dict() for a in monitor.alerts]
    atomic_write_text(out / "alerts.csv", _csv_text(alerts, ALERT_COLUMNS))
    atomic_write_text(out / "alerts.jsonl", "".join(json.dumps(a, ensure_ascii=False) + "\n"
                                                    for a in alerts))
    plot_trend(monitor, out / "trend.png")
    atomic_write_text(out / "report.md", format_report(monitor, source, final))


def _csv_text(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def topic_summary(monitor: Monitor) -> list[dict]:
    """Per topic: texts, negative, overall share, windows, highest share of a window with
    min_count texts; topics with the most texts first."""
    by_topic: dict[str, dict] = {}
    for (window, topic), counts in monitor.counts.items():
        row = by_topic.setdefault(topic, {"topic": topic, "texts": 0, "negative": 0,
                                          "windows": 0, "peak": None, "peak_window": None})
        n = sum(counts)
        row["texts"] += n
        row["negative"] += counts[monitor.negative]
        row["windows"] += 1
        share = counts[monitor.negative] / n
        if n >= monitor.settings.min_count and (row["peak"] is None or share > row["peak"]):
            row["peak"], row["peak_window"] = share, iso(window)
    for row in by_topic.values():
        row["share"] = row["negative"] / row["texts"]
        row["alerts"] = sum(a.topic == row["topic"] for a in monitor.alerts)
    return sorted(by_topic.values(), key=lambda r: (-r["texts"], r["topic"]))


def format_report(monitor: Monitor, source: str = "", final: bool = True) -> str:
    s = monitor.settings
    windows = sorted({w for w, _ in monitor.counts})
    lines = ["# Monitor report", "",
             f"- input: {source or 'rows'}: {monitor.texts} texts, {monitor.skipped} skipped "
             f"rows, {monitor.late} late texts" + ("" if final else " (still reading)"),
             f"- watched label: {s.negative_label} (labels: {', '.join(monitor.labels)}); "
             f"window {s.window}; alert at share >= {s.threshold:g} or a change >= "
             f"{s.change:g}, in windows with >= {s.min_count} texts"]
    if windows:
        lines.append(f"- period: {iso(windows[0])} to {iso(windows[-1] + monitor.step)} "
                     f"({len(windows)} windows with texts)")
    lines += [f"- skipped: {p}" for p in monitor.problems[:5]]
    lines += ["", "## Topics", "",
              f"| topic | texts | {s.negative_label} | share | windows | highest window "
              "share | alerts |", "|---|---:|---:|---:|---:|---|---:|"]
    for row in topic_summary(monitor):
        peak = f"{row['peak']:.3f} ({row['peak_window']})" if row["peak"] is not None else "-"
        lines.append(f"| {row['topic']} | {row['texts']} | {row['negative']} | "
                     f"{row['share']:.3f} | {row['windows']} | {peak} | {row['alerts']} |")
    lines += ["", f"## Alerts ({len(monitor.alerts)})", ""]
    if monitor.alerts:
        lines += ["| window start | topic | reason | share | previous | texts |",
                  "|---|---|---|---:|---:|---:|"]
        for a in monitor.alerts:
            previous = "-" if a.previous_share is None else f"{a.previous_share:.3f}"
            lines.append(f"| {a.window_start} | {a.topic} | {a.reason} | "
                         f"{a.negative_share:.3f} | {previous} | {a.count} |")
    else:
        lines.append("none")
    lines += ["", "![negative share per topic](trend.png)", "",
              "Files: series.csv (per window and topic), alerts.csv, alerts.jsonl, trend.png.",
              ""]
    return "\n".join(lines)


def plot_trend(monitor: Monitor, path, max_topics: int = 10) -> None:
    """Share of the watched label per topic over time (lines, alerts marked), texts per window
    as stacked bars on a second axis. The `max_topics` topics with most texts are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    s = monitor.settings
    topics = [row["topic"] for row in topic_summary(monitor)]
    shown = topics[:max_topics]
    fig, ax = plt.subplots(figsize=(11, 5))
    bars = ax.twinx()
    width = monitor.step / 86400 * 0.9  # matplotlib dates count days
    bottoms: dict[int, int] = {}
    colours = plt.get_cmap("tab10")
    for i, topic in enumerate(shown):
        cells = sorted((w, c) for (w, t), c in monitor.counts.items() if t == topic)
        xs, ys, prev = [], [], None
        for window, counts in cells:
            if prev is not None and window - monitor.step > prev:  # a gap: break the line
                xs.append(_centre(prev + monitor.step, monitor.step))
                ys.append(float("nan"))
            xs.append(_centre(window, monitor.step))
            ys.append(counts[monitor.negative] / sum(counts))
            prev = window
        colour = colours(i % 10)
        ax.plot(xs, ys, "o-", color=colour, markersize=3, label=topic)
        heights = [sum(c) for _, c in cells]
        base = [bottoms.get(w, 0) for w, _ in cells]
        bars.bar([_centre(w, monitor.step) for w, _ in cells], heights, width, bottom=base,
                 color=colour, alpha=0.18)
        for (w, _), h in zip(cells, heights):
            bottoms[w] = bottoms.get(w, 0) + h
    for reason, marker, colour in (("threshold", "^", "red"), ("change", "D", "darkorange")):
        hits = [a for a in monitor.alerts if a.reason == reason and a.topic in shown]
        if hits:
            ax.scatter([_centre(parse_time(a.window_start), monitor.step) for a in hits],
                       [a.negative_share for a in hits], s=90, marker=marker, facecolors="none",
                       edgecolors=colour, linewidths=1.8, zorder=5, label=f"alert: {reason}")
    ax.axhline(s.threshold, color="grey", linestyle="--", linewidth=1,
               label=f"threshold {s.threshold:g}")
    ax.set_ylim(0, 1.05)
    if bottoms:  # bars in the lower part, under the lines
        bars.set_ylim(0, 2.2 * max(bottoms.values()))
    ax.set_ylabel(f"{s.negative_label} share")
    bars.set_ylabel("texts per window (bars)")
    ax.set_zorder(bars.get_zorder() + 1)  # lines over bars
    ax.patch.set_visible(False)
    more = f" (top {len(shown)} of {len(topics)} topics)" if len(topics) > len(shown) else ""
    ax.set_title(f"{s.negative_label} share per {s.window} window (UTC){more}")
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    if shown:
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _centre(window: float, step: int) -> datetime:
    return datetime.fromtimestamp(window + step / 2, timezone.utc)
