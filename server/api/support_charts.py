"""The support view's charts as SVG, drawn by the server: no script, no outside font.

Pure functions from counts to SVG text. Every text that goes into the
document, including the numbers and dates, passes through :func:`_esc`,
so nothing in a label can open an element or an attribute. Styling uses
presentation attributes only (no ``style``), which the pages' strict
Content-Security-Policy allows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from xml.sax.saxutils import escape

from audit.support import DurationBucket

WIDTH, HEIGHT = 720, 280
# The plot area inside the picture.
LEFT, RIGHT, TOP, BOTTOM = 52, WIDTH - 16, 34, HEIGHT - 46
# At most this many labels under the bars; more would overlap.
MAX_X_LABELS = 14

BAR_COLOUR = "#1f5fa8"
GRID_COLOUR = "#d8dee4"
TEXT_COLOUR = "#52606d"
FONT = "system-ui, -apple-system, Segoe UI, Roboto, sans-serif"

LANGUAGES = ("en", "nl")

_MONTHS = {
    "en": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    "nl": ("jan", "feb", "mrt", "apr", "mei", "jun", "jul", "aug", "sep", "okt", "nov", "dec"),
}

_TEXTS = {
    "en": {
        "consult": "consult",
        "consults": "consults",
        "minutes": "minutes",
        "per_day.title": "Consults per day",
        "per_day.desc": "{total} from {first} to {last}. Busiest day: {peak_day}, {peak}.",
        "per_day.empty": "No consults from {first} to {last}.",
        "durations.title": "Duration of consults",
        "durations.desc": "{total} that ended, from {first} to {last}. Median duration: "
        "{median} minutes. Most often: {mode} minutes.",
        "durations.empty": "No ended consults from {first} to {last}.",
        "durations.bucket": "{range} minutes: {count}",
        "nothing": "Nothing in this period",
    },
    "nl": {
        "consult": "consult",
        "consults": "consulten",
        "minutes": "minuten",
        "per_day.title": "Consulten per dag",
        "per_day.desc": "{total} van {first} tot en met {last}. Drukste dag: {peak_day}, {peak}.",
        "per_day.empty": "Geen consulten van {first} tot en met {last}.",
        "durations.title": "Duur van de consulten",
        "durations.desc": "{total} beëindigd, van {first} tot en met {last}. Mediane duur: "
        "{median} minuten. Meestal: {mode} minuten.",
        "durations.empty": "Geen beëindigde consulten van {first} tot en met {last}.",
        "durations.bucket": "{range} minuten: {count}",
        "nothing": "Niets in deze periode",
    },
}


@dataclass(frozen=True)
class Bar:
    value: int
    # Under the bar; empty for no label.
    label: str
    # Said when the pointer rests on the bar (its <title>).
    tooltip: str


def _esc(text: object) -> str:
    """Text for an element or a double-quoted attribute."""
    return escape(str(text), {'"': "&quot;"})


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _text(lang: str, key: str, **values: object) -> str:
    return _TEXTS[lang][key].format(**values)


def _count(lang: str, count: int) -> str:
    return f"{count} {_text(lang, 'consult' if count == 1 else 'consults')}"


def day_label(day: date, lang: str, *, with_year: bool = False) -> str:
    label = f"{day.day} {_MONTHS[lang][day.month - 1]}"
    return f"{label} {day.year}" if with_year else label


def _scale(top_value: int) -> tuple[int, int]:
    """A round top for the y axis and the step between its grid lines (at most 5)."""
    for magnitude in (10**power for power in range(10)):
        for step in (magnitude, 2 * magnitude, 5 * magnitude):
            if math.ceil(top_value / step) <= 5:
                return max(step, step * math.ceil(top_value / step)), step
    return top_value, top_value  # pragma: no cover - beyond 5e9 consults


def bar_chart(
    *,
    title: str,
    description: str,
    bars: Sequence[Bar],
    y_caption: str,
    x_caption: str = "",
    empty_note: str = "",
) -> str:
    """An SVG bar chart with a grid; one ``<rect class="bar">`` per bar, zero-height ones too."""
    top, step = _scale(max((bar.value for bar in bars), default=0))
    plot_height = BOTTOM - TOP
    slot = (RIGHT - LEFT) / max(1, len(bars))
    bar_width = max(1.0, slot * 0.72)
    font = f'font-family="{_esc(FONT)}" fill="{TEXT_COLOUR}"'
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title chart-desc">',
        f'<title id="chart-title">{_esc(title)}</title>',
        f'<desc id="chart-desc">{_esc(description)}</desc>',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="{TOP - 14}" font-size="12" {font}>{_esc(y_caption)}</text>',
    ]
    for tick in range(0, top + 1, step):
        y = BOTTOM - tick / top * plot_height
        parts.append(
            f'<line x1="{LEFT}" y1="{_num(y)}" x2="{RIGHT}" y2="{_num(y)}" '
            f'stroke="{GRID_COLOUR}" stroke-width="1"/>'
            f'<text x="{LEFT - 8}" y="{_num(y + 4)}" font-size="12" text-anchor="end" {font}>'
            f"{_esc(tick)}</text>"
        )
    parts.append('<g class="bars">')
    show_values = slot >= 18
    for index, bar in enumerate(bars):
        height = bar.value / top * plot_height
        x = LEFT + index * slot + (slot - bar_width) / 2
        centre = LEFT + index * slot + slot / 2
        parts.append(
            f'<rect class="bar" x="{_num(x)}" y="{_num(BOTTOM - height)}" '
            f'width="{_num(bar_width)}" height="{_num(height)}" rx="2" fill="{BAR_COLOUR}">'
            f"<title>{_esc(bar.tooltip)}</title></rect>"
        )
        if show_values and bar.value:
            parts.append(
                f'<text x="{_num(centre)}" y="{_num(BOTTOM - height - 5)}" font-size="11" '
                f'text-anchor="middle" {font}>{_esc(bar.value)}</text>'
            )
        if bar.label:
            parts.append(
                f'<text x="{_num(centre)}" y="{BOTTOM + 18}" font-size="12" '
                f'text-anchor="middle" {font}>{_esc(bar.label)}</text>'
            )
    parts.append("</g>")
    parts.append(
        f'<line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}" '
        f'stroke="{TEXT_COLOUR}" stroke-width="1"/>'
    )
    if x_caption:
        parts.append(
            f'<text x="{RIGHT}" y="{HEIGHT - 6}" font-size="12" text-anchor="end" {font}>'
            f"{_esc(x_caption)}</text>"
        )
    if empty_note:
        parts.append(
            f'<text x="{_num((LEFT + RIGHT) / 2)}" y="{_num((TOP + BOTTOM) / 2)}" '
            f'font-size="15" text-anchor="middle" {font}>{_esc(empty_note)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def consults_per_day_svg(days: Sequence[tuple[date, int]], *, lang: str) -> str:
    """One bar per day, in order; labels under every few days."""
    every = max(1, math.ceil(len(days) / MAX_X_LABELS))
    bars = [
        Bar(
            count,
            day_label(day, lang) if index % every == 0 else "",
            f"{day_label(day, lang, with_year=True)}: {_count(lang, count)}",
        )
        for index, (day, count) in enumerate(days)
    ]
    total = sum(count for _, count in days)
    span = {
        "first": day_label(days[0][0], lang, with_year=True) if days else "",
        "last": day_label(days[-1][0], lang, with_year=True) if days else "",
    }
    if total:
        peak_day, peak = max(days, key=lambda item: (item[1], item[0]))
        description = _text(
            lang,
            "per_day.desc",
            total=_count(lang, total),
            peak_day=day_label(peak_day, lang, with_year=True),
            peak=_count(lang, peak),
            **span,
        )
    else:
        description = _text(lang, "per_day.empty", **span)
    return bar_chart(
        title=_text(lang, "per_day.title"),
        description=description,
        bars=bars,
        y_caption=_text(lang, "consults"),
        empty_note="" if total else _text(lang, "nothing"),
    )


def bucket_range(bucket: DurationBucket) -> str:
    if bucket.upper_min is None:
        return f"{bucket.lower_min}+"
    return f"{bucket.lower_min}\u2013{bucket.upper_min}"


def durations_svg(
    buckets: Sequence[DurationBucket],
    durations_s: Sequence[int],
    *,
    first_day: date,
    last_day: date,
    lang: str,
) -> str:
    """One bar per duration bucket (all of them, empty ones too)."""
    bars = [
        Bar(
            bucket.count,
            bucket_range(bucket),
            _text(
                lang,
                "durations.bucket",
                range=bucket_range(bucket),
                count=_count(lang, bucket.count),
            ),
        )
        for bucket in buckets
    ]
    span = {
        "first": day_label(first_day, lang, with_year=True),
        "last": day_label(last_day, lang, with_year=True),
    }
    if durations_s:
        busiest = max(buckets, key=lambda bucket: bucket.count)
        description = _text(
            lang,
            "durations.desc",
            total=_count(lang, len(durations_s)),
            median=_num(round(statistics.median(durations_s) / 60, 1)),
            mode=bucket_range(busiest),
            **span,
        )
    else:
        description = _text(lang, "durations.empty", **span)
    return bar_chart(
        title=_text(lang, "durations.title"),
        description=description,
        bars=bars,
        y_caption=_text(lang, "consults"),
        x_caption=_text(lang, "minutes"),
        empty_note="" if durations_s else _text(lang, "nothing"),
    )
