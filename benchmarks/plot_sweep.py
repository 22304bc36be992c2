"""PNG plots of setting sweeps: Ferry's rows/s against the setting, the baseline as a reference line.

    python -m benchmarks.plot_sweep benchmarks/results/tuning.jsonl docs/images/
    python -m benchmarks.plot_sweep results.jsonl chart.png --route memory-to-s3 --setting parallel

Reads the lines a sweep wrote (``python -m benchmarks ... --vary SETTING=...
--out FILE``; lines without ``sweep_setting`` are left out) and draws one
chart per (route, setting). Into a folder, every chart is written as
``tuning-<route>-<setting>.png`` (dots in the setting become dashes); into a
``.png`` file, exactly one (route, setting) must be left after ``--route`` /
``--setting``.

In a chart, each line is one row count (and one set of the other settings,
when the file holds several): the median rows/s at every value, with a bar
from the slowest to the fastest run where the line carries its runs. A
baseline that does not use the swept setting is drawn as one dashed
horizontal line per Ferry line, at the median of its points' figures, and
each point's own figure as a grey dot (they differ only by the machine's
noise). A baseline that uses the setting too (``batch_size`` for the
benchmark command's baselines, see :func:`baseline_settings`) is drawn as a
dashed line through its points instead. When the file holds several lines
for one point -- results appended over time -- only the newest (by
``timestamp``) is drawn.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from .plot import human, json_lines

REQUIRED = ("route", "rows", "rows_per_s", "sweep_setting", "sweep_value")
COLORS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b7791f", "#c53030")


def load_sweeps(path: str | Path) -> list[dict[str, Any]]:
    """The sweep lines of a JSON-lines file; malformed lines are skipped with a warning, others silently."""
    records = []
    for number, record in json_lines(path):
        if not isinstance(record, dict) or "sweep_setting" not in record:
            continue  # a plain benchmark line: not part of any sweep
        if any(record.get(k) is None for k in REQUIRED):
            print(f"{path}:{number}: skipped, a sweep line needs {', '.join(REQUIRED)}", file=sys.stderr)
            continue
        records.append(record)
    return records


def _others(record: dict[str, Any]) -> tuple:
    """The settings a sweep line held fixed (all but the swept one), as a hashable key."""
    swept = record["sweep_setting"]
    fixed = {"parallel": record.get("parallel"), "batch_size": record.get("batch_size"), **(record.get("settings") or {})}
    fixed.pop(swept, None)
    return tuple(sorted((k, v) for k, v in fixed.items() if v is not None))


def group_sweeps(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple, list[dict[str, Any]]]]:
    """(route, setting) -> (rows, fixed settings) -> the newest line per value, sorted by value."""
    newest: dict[tuple, dict[str, Any]] = {}
    for record in records:
        key = (record["route"], record["sweep_setting"], record["rows"], _others(record), record["sweep_value"])
        kept = newest.get(key)
        if kept is None or str(record.get("timestamp", "")) >= str(kept.get("timestamp", "")):
            newest[key] = record
    groups: dict[tuple[str, str], dict[tuple, list[dict[str, Any]]]] = {}
    for (route, swept, rows, others, _), record in newest.items():
        groups.setdefault((route, swept), {}).setdefault((rows, others), []).append(record)
    for lines in groups.values():
        for points in lines.values():
            points.sort(key=lambda r: r["sweep_value"])
    return groups


def plot_filename(route: str, setting: str, prefix: str = "tuning") -> str:
    """``tuning-<route>-<setting>.png`` with anything but letters, digits and dashes turned into dashes."""
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", f"{route}-{setting}").strip("-")
    return f"{prefix}-{slug}.png"


def _run_rates(record: dict[str, Any]) -> list[float]:
    """rows/s of each Ferry run of a line, when it carries them (``runs.seconds``)."""
    runs = record.get("runs")
    seconds = runs.get("seconds") if isinstance(runs, dict) else None
    if not seconds:
        return []
    return [record["rows"] / s for s in seconds if s and s > 0]


def baseline_settings(record: dict[str, Any]) -> list[str]:
    """The sweep settings the line's baseline uses too: ``baseline_settings``, else ``batch_size``.

    The benchmark command's baselines take ``--batch-size``; a route whose
    baseline uses other settings lists them in its lines (``records-pooling``:
    ``parallel``, its reads in flight).
    """
    return list(record.get("baseline_settings", ["batch_size"]))


def _describe(others: tuple) -> str:
    return ", ".join(f"{'batch' if k == 'batch_size' else k} {v:,}" for k, v in others)


def plot_sweep(
    lines: dict[tuple, list[dict[str, Any]]], route: str, setting: str, out: str | Path, *, title: str | None = None
) -> Path:
    """Draw one (route, setting) chart (``lines`` as :func:`group_sweeps` gives them) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not lines:
        raise ValueError(f"no sweep lines for {route} / {setting}")
    values = sorted({r["sweep_value"] for points in lines.values() for r in points})
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=120)
    # Powers of two and wide ranges read best on a log axis; a few small values on a linear one.
    if len(values) > 1 and values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log", base=2)
    keys = sorted(lines, key=lambda k: (k[0], k[1]))
    varying = {k: len({dict(o).get(k) for _, o in keys}) > 1 for k in {k for _, o in keys for k, _ in o}}
    many_rows = len({rows for rows, _ in keys}) > 1
    first = lines[keys[0]][0]
    # Record-API routes count operations (``method``), not rows.
    unit = f"{first['method']}s" if first.get("method") else "rows"
    top = 0.0
    for index, key in enumerate(keys):
        rows, others = key
        points = lines[key]
        color = COLORS[index % len(COLORS)]
        label = "Ferry"
        if many_rows or len(keys) > 1:
            label += f", {human(rows)} {unit}"
        differing = tuple((k, v) for k, v in others if varying.get(k))
        if differing:
            label += f", {_describe(differing)}"
        xs = [r["sweep_value"] for r in points]
        ys = [r["rows_per_s"] for r in points]
        ax.plot(xs, ys, marker="o", color=color, label=label, zorder=3)
        top = max(top, *ys)
        for x, record in zip(xs, points):
            rates = _run_rates(record)
            if len(rates) > 1:
                ax.vlines(x, min(rates), max(rates), color=color, alpha=0.5, linewidth=2, zorder=2)
                top = max(top, max(rates))
        measured = [r for r in points if r.get("baseline_rows_per_s")]
        if not measured:
            continue
        baselines = [r["baseline_rows_per_s"] for r in measured]
        name = measured[0].get("baseline") or "baseline"
        top = max(top, *baselines)
        if setting in baseline_settings(measured[0]):
            # The baseline uses this setting too: a horizontal line would hide what it does to it.
            ax.plot(
                [r["sweep_value"] for r in measured], baselines, linestyle="--", marker=".", color=color, alpha=0.8,
                label=f"baseline: {name} (uses {setting} too)",
            )  # fmt: skip
            continue
        reference = statistics.median(baselines)
        ax.axhline(reference, color=color, linestyle="--", alpha=0.8, label=f"baseline: {name} ({human(reference)}/s)")
        ax.scatter(
            [r["sweep_value"] for r in measured], baselines,
            color="#a0aec0", s=14, zorder=2, label="baseline at each point" if index == 0 else None,
        )  # fmt: skip
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:,}" for v in values], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(setting)
    ax.set_ylabel(f"{unit}/s (median)")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: human(value)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
    common = tuple((k, v) for k, v in keys[0][1] if not varying.get(k))
    facts = [_describe(common)] if common else []
    if not many_rows:
        facts.append(f"{human(first['rows'])} {unit}")
    if first.get("cpu_count"):
        facts.append(f"{first['cpu_count']} CPUs")
    fig.suptitle(title or f"{route}: {unit}/s by {setting}" + (f" ({'; '.join(facts)})" if facts else ""), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def plot_all(
    records: Iterable[dict[str, Any]],
    out: str | Path,
    *,
    route: str | None = None,
    setting: str | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write the charts of ``records``: every (route, setting) into a folder, or exactly one into a ``.png``."""
    groups = {
        key: lines
        for key, lines in group_sweeps(records).items()
        if (route is None or key[0] == route) and (setting is None or key[1] == setting)
    }
    if not groups:
        raise ValueError("no sweep lines to plot" + (" for that --route / --setting" if route or setting else ""))
    out = Path(out)
    if out.suffix.lower() == ".png":
        if len(groups) > 1:
            names = ", ".join(f"{r} / {s}" for r, s in groups)
            raise ValueError(f"{out} is one chart but the file holds {len(groups)} sweeps ({names}); "
                             "pick one with --route and --setting, or give a folder")  # fmt: skip
        ((route_name, swept), lines), = groups.items()
        return [plot_sweep(lines, route_name, swept, out, title=title)]
    return [plot_sweep(lines, r, s, out / plot_filename(r, s), title=title) for (r, s), lines in groups.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON-lines file written by `python -m benchmarks ... --vary ... --out FILE`")
    parser.add_argument("out", help="a folder (one PNG per route and setting) or a .png file (one chart)")
    parser.add_argument("--route", help="only this route")
    parser.add_argument("--setting", help="only this swept setting")
    parser.add_argument("--title", help="chart title")
    args = parser.parse_args(argv)
    try:
        paths = plot_all(load_sweeps(args.results), args.out, route=args.route, setting=args.setting, title=args.title)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
