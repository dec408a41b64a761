"""The report of a lab run: ``report.json``, ``timeline.jsonl`` and ``timeline.png`` in one dir.

Invariants:
- ``write_report`` checks the report before it creates or writes anything: ``scenario`` must
  be a non-empty string and ``ok`` a bool, else ``ValueError`` names the key.
- ``report.json`` is written whole or not at all (a temporary file, then a rename), with
  sorted keys and indentation; a value JSON cannot hold is written as its ``str()``.
- The report dir ends up with the timeline's JSON lines in ``timeline.jsonl``: left alone when
  the timeline records there itself, else copied from the timeline's file, else written from
  memory.
- Importing this module does not import matplotlib; ``render_timeline`` imports it and draws
  with the Agg canvas directly (no pyplot, no global backend switch), so it works headless and
  from any thread.
- Lanes are ordered by ``lane_order``: hosts in natural order (h1, h2, ..., h10), then VMs
  (vm1, ...), then networks (in ``NETWORKS`` order, then others by name), then any other
  subject, then "lab". The picture is 1400 px wide and 200 + 60 px per lane tall, plus
  180 px per sample strip (one per sample name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from netsvc.lab.timeline import Event, Kind, Timeline

NETWORKS: tuple[str, ...] = ("mgmt", "vmnet", "storage-a", "storage-b", "site", "memfab")
"""The lab's networks; a fault on one of them is shaded across the whole picture."""

_HOST = re.compile(r"h\d+")
_VM = re.compile(r"vm\d+")

# The picture's geometry, in pixels at DPI.
DPI = 100
WIDTH_PX = 1400
LANE_PX = 60
TOP_PX = 120
BOTTOM_PX = 80
LEFT_PX = 110
RIGHT_PX = 30
STRIP_PX = 150
STRIP_GAP_PX = 30
LABEL_PT = 7.0
MAX_LABELS_PER_LANE = 40
MAX_LABELS = 320  # over all lanes: text is the slow part of drawing
MAX_ACTION_LINES = 60


@dataclass(frozen=True)
class MarkStyle:
    marker: str
    color: str
    size: float


EVENT_STYLE = MarkStyle("o", "#1f77b4", 26.0)
ACTION_STYLE = MarkStyle("D", "#2ca02c", 26.0)
FAULT_COLORS = {"crash": "#d62728", "cut": "#9467bd", "loss": "#ff7f0e", "partition": "#8c564b"}
_MORE_FAULT_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#7f7f7f")
HOST_COLORS = (
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
)

# How a VM's lane shows where it lives: these events start or move a residence bar ...
RESIDENCE_START = {
    "start": "host",
    "started": "host",
    "vm-started": "host",
    "respawned": "host",
    "migrated": "dst",
}
# ... and these end it.
RESIDENCE_END = frozenset({"stop", "stopped", "died", "crashed", "vm-stopped", "destroy"})


# --- report.json ---------------------------------------------------------------------------
def validate_report(report: object) -> None:
    """Raise ValueError naming the first missing or ill-typed required key."""
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict, got {type(report).__name__}")
    if "scenario" not in report:
        raise ValueError("report is missing key 'scenario'")
    if not isinstance(report["scenario"], str) or not report["scenario"]:
        raise ValueError(
            f"report key 'scenario' must be a non-empty str, got {report['scenario']!r}"
        )
    if "ok" not in report:
        raise ValueError("report is missing key 'ok'")
    if not isinstance(report["ok"], bool):
        raise ValueError(f"report key 'ok' must be a bool, got {report['ok']!r}")


def write_report(report_dir: Path, report: dict[str, object], timeline: Timeline) -> None:
    """Write ``report.json``, ``timeline.jsonl`` and ``timeline.png`` into ``report_dir``."""
    validate_report(report)
    report_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, sort_keys=True, indent=2, default=str) + "\n"
    tmp = report_dir / ".report.json.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, report_dir / "report.json")

    jsonl = report_dir / "timeline.jsonl"
    src = timeline.path
    if src is None or not src.exists():
        timeline.write_jsonl(jsonl)
    elif not (jsonl.exists() and src.samefile(jsonl)):
        shutil.copyfile(src, jsonl)

    verdict = "PASSED" if report["ok"] else "FAILED"
    figures = [
        f"{k}={v}"
        for k, v in sorted(report.items())
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k.endswith(("_ms", "_s"))
        and k != "duration_s"
    ]
    render_timeline(
        timeline.events(),
        report_dir / "timeline.png",
        f"scenario {report['scenario']}: {verdict}",
        subtitle="  ".join(figures[:6]) or None,
    )


# --- lanes ---------------------------------------------------------------------------------
def natural_key(s: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders embedded numbers by value: h2 < h10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p)


def lane_group(subject: str, networks: Collection[str] = NETWORKS) -> int:
    """0 host, 1 VM, 2 network, 3 anything else, 4 the lab itself."""
    if _HOST.fullmatch(subject):
        return 0
    if _VM.fullmatch(subject):
        return 1
    if subject in networks:
        return 2
    return 4 if subject == "lab" else 3


def lane_order(subjects: Iterable[str], networks: Collection[str] = NETWORKS) -> list[str]:
    """The lanes of the picture, top to bottom, one per distinct subject."""
    nets = list(networks)

    def key(s: str) -> tuple[int, int, tuple[tuple[int, int, str], ...]]:
        g = lane_group(s, networks)
        return g, nets.index(s) if g == 2 else 0, natural_key(s)

    return sorted(set(subjects), key=key)


# --- what to draw --------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultSpan:
    subject: str
    name: str
    fault_id: str
    start: float
    end: float
    open: bool  # never ended: drawn to the end of the run
    details: dict[str, Any]


def fault_spans(events: Sequence[Event], t_end: float) -> tuple[list[FaultSpan], list[Event]]:
    """Pair fault starts and ends by fault_id; returns (spans, ends that matched no start)."""
    opened: dict[str, Event] = {}
    spans: list[FaultSpan] = []
    orphans: list[Event] = []
    for e in events:
        fid = e.fault_id
        if fid is None:
            continue
        if e.kind is Kind.FAULT_START:
            if fid in opened:  # restarted while open: close the first one here
                s = opened[fid]
                spans.append(FaultSpan(s.subject, s.name, fid, s.t, e.t, False, s.details))
            opened[fid] = e
        elif e.kind is Kind.FAULT_END:
            s2 = opened.pop(fid, None)
            if s2 is None:
                orphans.append(e)
            else:
                spans.append(FaultSpan(s2.subject, s2.name, fid, s2.t, e.t, False, s2.details))
    for fid, s in opened.items():
        spans.append(FaultSpan(s.subject, s.name, fid, s.t, max(t_end, s.t), True, s.details))
    spans.sort(key=lambda f: f.start)
    return spans, orphans


def residences(events: Sequence[Event], t_end: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per VM, where it lived: (start, end, host) bars from its start/migrated/stop events."""
    out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    current: dict[str, tuple[float, str]] = {}
    for e in events:
        if e.kind is not Kind.EVENT or not _VM.fullmatch(e.subject):
            continue
        if e.name in RESIDENCE_START and isinstance(e.details.get(RESIDENCE_START[e.name]), str):
            if e.subject in current:
                t0, host = current[e.subject]
                out[e.subject].append((t0, e.t, host))
            current[e.subject] = (e.t, e.details[RESIDENCE_START[e.name]])
        elif e.name in RESIDENCE_END and e.subject in current:
            t0, host = current.pop(e.subject)
            out[e.subject].append((t0, e.t, host))
    for vm, (t0, host) in current.items():
        out[vm].append((t0, max(t_end, t0), host))
    return dict(out)


def label_of(e: Event) -> str:
    src, dst = e.details.get("src"), e.details.get("dst")
    if isinstance(src, str) and isinstance(dst, str):
        return f"{e.name} {src}\u2192{dst}"
    return e.name


def _fault_color(name: str, extra: dict[str, str]) -> str:
    if name in FAULT_COLORS:
        return FAULT_COLORS[name]
    if name not in extra:
        extra[name] = _MORE_FAULT_COLORS[len(extra) % len(_MORE_FAULT_COLORS)]
    return extra[name]


class _LabelSlots:
    """Greedy label placement on one lane: two rows (above, below); a label that fits
    neither is dropped, so labels never overlap one another."""

    def __init__(self, limit: int) -> None:
        self.rows: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
        self.limit = limit
        self.placed = 0

    def take(self, x0: float, x1: float, rows: Sequence[int] = (0, 1)) -> int | None:
        if self.placed >= self.limit:
            return None
        for r in rows:
            if all(x1 + 3 <= a or x0 - 3 >= b for a, b in self.rows[r]):
                self.rows[r].append((x0, x1))
                self.placed += 1
                return r
        return None


def _touches(
    f: FaultSpan,
    subjects: set[str],
    lived: dict[str, list[tuple[float, float, str]]],
    networks: Collection[str],
) -> bool:
    """Whether fault ``f`` can bear on samples of ``subjects``: it is on a network, on one
    of them, or on a host one of them (a VM) lived on while the fault was on."""
    if f.subject in networks or f.subject in subjects:
        return True
    return any(
        host == f.subject and t0 < f.end and f.start < t1
        for s in subjects
        for t0, t1, host in lived.get(s, ())
    )


def spread(items: Sequence[Event], k: int) -> list[Event]:
    """``items`` reordered so that the first ``k`` are spread evenly over the sequence (first
    and last included), then the rest in order: a lane with more events than label room gets
    labels across the whole run, not only at its start."""
    m = len(items)
    if m <= k or k < 2:
        return list(items)
    picked = sorted({round(i * (m - 1) / (k - 1)) for i in range(k)})
    chosen = set(picked)
    return [items[i] for i in picked] + [x for i, x in enumerate(items) if i not in chosen]


def _text_px(text: str, pt: float = LABEL_PT) -> float:
    return len(text) * pt * DPI / 72 * 0.58 + 4


# --- the picture ---------------------------------------------------------------------------
def render_timeline(
    events: Sequence[Event],
    path: Path,
    title: str,
    *,
    subtitle: str | None = None,
    networks: Collection[str] = NETWORKS,
    max_labels_per_lane: int = MAX_LABELS_PER_LANE,
) -> None:
    """Draw the run as a PNG at ``path``: one lane per subject, time on the x axis.

    Point events are blue circles, actions green diamonds, each with a small label where it
    fits. Fault intervals shade their lane (hatched when the run ended with the fault still
    on); a fault on a network also shades every lane lightly. VM lanes carry a thin bar per
    host the VM lived on. Samples are drawn in a strip per sample name below the lanes.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Rectangle
    except ImportError as exc:  # pragma: no cover - matplotlib is in the lab extra
        raise RuntimeError(
            f"timeline.png needs matplotlib (pip install 'netsvc[lab]'): {exc}"
        ) from exc

    evs = sorted(events, key=lambda e: (e.t, e.seq))
    samples = [e for e in evs if e.kind is Kind.SAMPLE and e.value is not None]
    marks = [e for e in evs if e.kind is not Kind.SAMPLE]
    lanes = lane_order((e.subject for e in marks), networks) or ["lab"]
    row = {s: i for i, s in enumerate(lanes)}
    n = len(lanes)

    t_min = min([0.0, *(e.t for e in evs)])
    t_last = max([e.t for e in evs] or [0.0])
    span = max(t_last - t_min, 1.0)
    x_lo, x_hi = t_min - 0.01 * span, t_last + 0.03 * span

    strip_names = sorted({e.name for e in samples}, key=natural_key)
    strips_px = len(strip_names) * (STRIP_PX + STRIP_GAP_PX)
    height = TOP_PX + n * LANE_PX + strips_px + BOTTOM_PX
    fig = Figure(figsize=(WIDTH_PX / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    plot_w = WIDTH_PX - LEFT_PX - RIGHT_PX

    def frac_x(px: float) -> float:
        return px / WIDTH_PX

    def frac_y(px_from_bottom: float) -> float:
        return px_from_bottom / height

    lanes_bottom = BOTTOM_PX + strips_px
    ax = fig.add_axes(
        (frac_x(LEFT_PX), frac_y(lanes_bottom), plot_w / WIDTH_PX, n * LANE_PX / height)
    )
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(lanes, fontsize=9)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for i in range(n):
        if i % 2:
            ax.axhspan(i - 0.5, i + 0.5, color="#f4f4f4", zorder=0)
        if i and lane_group(lanes[i], networks) != lane_group(lanes[i - 1], networks):
            ax.axhline(i - 0.5, color="#999999", linewidth=0.8, zorder=1)

    def px_of(t: float) -> float:
        return (t - x_lo) / (x_hi - x_lo) * plot_w

    per_lane = max(2, min(max_labels_per_lane, MAX_LABELS // n))
    slots = {s: _LabelSlots(per_lane) for s in lanes}
    row_dy = (-0.27, 0.27)  # label rows, in lane units: above, below the marker line
    legend: list[Any] = []

    # Faults: shaded intervals on their lane; a network fault also lightly across all lanes.
    spans, orphans = fault_spans(evs, x_hi)
    extra_colors: dict[str, str] = {}
    seen_faults: set[tuple[str, bool]] = set()
    net_spans = [f for f in spans if f.subject in networks]
    for f in spans:
        color = _fault_color(f.name, extra_colors)
        y = row.get(f.subject)
        if y is None:
            continue
        ax.add_patch(
            Rectangle(
                (f.start, y - 0.44),
                max(f.end - f.start, 1e-9),
                0.88,
                facecolor=color,
                alpha=0.22,
                edgecolor=color,
                linewidth=0.8,
                hatch="///" if f.open else None,
                zorder=1,
            )
        )
        on_net = f.subject in networks
        if (f.name, on_net) not in seen_faults:
            seen_faults.add((f.name, on_net))
            where = f" on a network ({f.subject}, all lanes)" if on_net else ""
            legend.append(
                Patch(facecolor=color, alpha=0.35, edgecolor=color, label=f"fault: {f.name}{where}")
            )
        text = f.name + (" (still on at the end)" if f.open else "")
        x0 = px_of(f.start) + 2
        r = slots[f.subject].take(x0, x0 + _text_px(text, LABEL_PT + 0.5), rows=(0,))
        if r is not None:
            ax.text(
                f.start,
                y + row_dy[r],
                " " + text,
                fontsize=LABEL_PT + 0.5,
                color=color,
                fontstyle="italic",
                fontweight="bold",
                va="center",
                ha="left",
                zorder=4,
            )
    for f in net_spans:
        ax.axvspan(f.start, f.end, color=_fault_color(f.name, extra_colors), alpha=0.07, zorder=0)
    if any(f.open for f in spans):
        legend.append(
            Patch(
                facecolor="white",
                edgecolor="#555555",
                hatch="///",
                label="fault still on at the end",
            )
        )

    # VM residence: a thin bar per host the VM lived on, named at its start.
    lived = residences(evs, x_hi)
    host_color = {
        h: HOST_COLORS[i % len(HOST_COLORS)]
        for i, h in enumerate(
            lane_order(
                {h for bars in lived.values() for _, _, h in bars}
                | {s for s in lanes if lane_group(s, networks) == 0},
                networks,
            )
        )
    }
    for vm, bars in lived.items():
        y = row.get(vm)
        if y is None:
            continue
        for t0, t1, host in bars:
            c = host_color.get(host, "#888888")
            ax.plot(
                (t0, t1),
                (y, y),
                color=c,
                linewidth=3.2,
                alpha=0.55,
                solid_capstyle="butt",
                zorder=2,
            )
            x0 = px_of(t0) + 2
            r = slots[vm].take(x0, x0 + _text_px("on " + host), rows=(1,))
            if r is not None:
                ax.text(
                    t0,
                    y + row_dy[r],
                    " on " + host,
                    fontsize=LABEL_PT,
                    color=c,
                    va="center",
                    ha="left",
                    zorder=4,
                )
    if lived:
        legend.append(
            Line2D([], [], color="#888888", linewidth=3.2, alpha=0.55, label="VM running (on host)")
        )

    # Point events and actions: one scatter per kind, then labels where they fit.
    for kind, style, name in (
        (Kind.EVENT, EVENT_STYLE, "event"),
        (Kind.ACTION, ACTION_STYLE, "action"),
    ):
        pts = [e for e in marks if e.kind is kind]
        if pts:
            ax.scatter(
                [e.t for e in pts],
                [row[e.subject] for e in pts],
                marker=style.marker,
                color=style.color,
                s=style.size,
                edgecolors="white",
                linewidths=0.6,
                zorder=5,
            )
            legend.append(
                Line2D([], [], linestyle="", marker=style.marker, color=style.color, label=name)
            )
    if orphans:
        ax.scatter(
            [e.t for e in orphans],
            [row[e.subject] for e in orphans],
            marker="|",
            color="black",
            s=120,
            zorder=5,
        )
        legend.append(
            Line2D([], [], linestyle="", marker="|", color="black", label="fault end with no start")
        )
    by_lane: dict[str, list[Event]] = defaultdict(list)
    for e in marks:
        if e.kind in (Kind.EVENT, Kind.ACTION):
            by_lane[e.subject].append(e)
    hidden = 0
    for e in (e for lane in lanes for e in spread(by_lane[lane], per_lane)):
        text = label_of(e)
        w = _text_px(text)
        x = px_of(e.t)
        x0 = min(max(x - w / 2, 0.0), plot_w - w)
        r = slots[e.subject].take(x0, x0 + w)
        if r is None:
            hidden += 1
        else:
            tx = e.t + (x0 + w / 2 - x) / plot_w * (x_hi - x_lo)  # label centre, kept inside
            ax.text(
                tx,
                row[e.subject] + row_dy[r],
                text,
                fontsize=LABEL_PT,
                ha="center",
                va="center",
                color="#333333",
                zorder=6,
            )

    # Samples: a strip per sample name, a line per subject.
    for i, sname in enumerate(strip_names):
        bottom = BOTTOM_PX + (len(strip_names) - 1 - i) * (STRIP_PX + STRIP_GAP_PX)
        sax = fig.add_axes(
            (frac_x(LEFT_PX), frac_y(bottom), plot_w / WIDTH_PX, STRIP_PX / height), sharex=ax
        )
        series: dict[str, list[Event]] = defaultdict(list)
        for e in samples:
            if e.name == sname:
                series[e.subject].append(e)
        values = [v for pts in series.values() for e in pts if (v := e.value) is not None]
        for subj in lane_order(series, networks):
            xy = [(e.t, v) for e in series[subj] if (v := e.value) is not None]
            sax.plot(
                [t for t, _ in xy],
                [v for _, v in xy],
                linewidth=0.8,
                marker=".",
                markersize=2.5,
                label=subj,
            )
        if values and min(values) > 0 and max(values) / min(values) > 50:
            sax.set_yscale("log")
        for f in spans:
            if _touches(f, set(series), lived, networks):
                sax.axvspan(
                    f.start, f.end, color=_fault_color(f.name, extra_colors), alpha=0.12, zorder=0
                )
        acts = [e for e in marks if e.kind is Kind.ACTION and e.subject in series]
        for a in acts[:MAX_ACTION_LINES]:
            sax.axvline(a.t, color=ACTION_STYLE.color, linewidth=0.8, linestyle=":", zorder=0)
        sax.set_ylabel(sname, fontsize=8)
        sax.tick_params(labelsize=8)
        sax.grid(color="#e6e6e6", linewidth=0.6)
        sax.legend(
            loc="upper right",
            fontsize=7,
            title="sample of",
            title_fontsize=7,
            ncols=min(len(series), 6),
            framealpha=0.8,
        )
        if i < len(strip_names) - 1:
            sax.tick_params(labelbottom=False)
        else:
            sax.set_xlabel("seconds since start", fontsize=9)
    if strip_names:
        ax.tick_params(labelbottom=False)
    else:
        ax.set_xlabel("seconds since start", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)

    # Title, a line of context, and the legend along the top.
    fig.text(0.5, 1 - 16 / height, title, ha="center", va="top", fontsize=14, fontweight="bold")
    walls = [e.wall for e in evs]
    context = f"{len(evs)} records, {t_last - t_min:.1f} s"
    if walls:
        start = datetime.fromtimestamp(min(walls), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        context += f", from {start}"
    if subtitle:
        context += "   |   " + subtitle
    fig.text(0.5, 1 - 46 / height, context, ha="center", va="top", fontsize=8, color="#555555")
    if legend:
        fig.legend(
            handles=legend,
            loc="upper center",
            ncols=min(len(legend), 8),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 1 - 66 / height),
        )
    if hidden:
        fig.text(
            frac_x(LEFT_PX),
            8 / height,
            f"{hidden} of {sum(map(len, by_lane.values()))} "
            "event labels left out where they would overlap (the markers are all there)",
            ha="left",
            va="bottom",
            fontsize=7,
            color="#777777",
        )
    if not evs:
        ax.text(
            0.5,
            0.5,
            "no events recorded",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=11,
            color="#777777",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
