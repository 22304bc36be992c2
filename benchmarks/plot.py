"""A PNG bar chart of a JSON-lines results file: rows/s, Ferry next to its baseline.

    python -m benchmarks.plot results.jsonl docs/benchmarks.png [--title TEXT]

One group of two bars per (route, row count): Ferry's ``rows_per_s`` and the
baseline's ``baseline_rows_per_s``, with ``ratio`` written above the pair.
When the file holds several lines for the same (route, rows, parallel,
batch_size) -- results appended over time -- only the newest (by
``timestamp``) is drawn. Lines that are not JSON objects with the needed
fields are skipped with a warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED = ("route", "rows", "rows_per_s", "baseline", "baseline_rows_per_s")


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each JSON line; blank lines are skipped, malformed ones with a warning."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            print(f"{path}:{number}: skipped, not JSON ({exc.msg})", file=sys.stderr)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank and malformed lines are skipped)."""
    records = []
    for number, record in json_lines(path):
        if not isinstance(record, dict) or any(record.get(k) is None for k in REQUIRED):
            print(f"{path}:{number}: skipped, needs {', '.join(REQUIRED)}", file=sys.stderr)
            continue
        records.append(record)
    return records


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record per (route, rows, parallel, batch_size), sorted by route order then rows."""
    newest: dict[tuple, dict[str, Any]] = {}
    order: dict[str, int] = {}
    for record in records:
        order.setdefault(record["route"], len(order))
        key = (record["route"], record["rows"], record.get("parallel"), record.get("batch_size"))
        kept = newest.get(key)
        if kept is None or str(record.get("timestamp", "")) >= str(kept.get("timestamp", "")):
            newest[key] = record
    return sorted(
        newest.values(),
        key=lambda r: (order[r["route"]], r["rows"], r.get("parallel") or 0, r.get("batch_size") or 0),
    )


def human(number: float) -> str:
    """1234567 -> '1.2M', 200000 -> '200k'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            text = f"{number / limit:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{number:g}"


def plot_results(records: Iterable[dict[str, Any]], out: str | Path, *, title: str | None = None) -> Path:
    """Draw the chart of ``records`` into the PNG file ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = latest(records)
    if not rows:
        raise ValueError("no results to plot")
    # Tell groups apart by parallel / batch size only when they vary.
    varies = {k: len({r.get(k) for r in rows}) > 1 for k in ("parallel", "batch_size")}

    def label(r: dict[str, Any]) -> str:
        text = f"{r['route']}\n{human(r['rows'])} rows"
        if varies["parallel"]:
            text += f", parallel {r.get('parallel')}"
        if varies["batch_size"]:
            text += f", batch {human(r.get('batch_size') or 0)}"
        return text + f"\nvs {r['baseline']}"

    width = 0.38
    positions = list(range(len(rows)))
    ferry = [r["rows_per_s"] for r in rows]
    base = [r["baseline_rows_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(rows) + 2), 4.8), dpi=120)
    ax.bar([p - width / 2 for p in positions], ferry, width, label="Ferry", color="#2b6cb0")
    ax.bar([p + width / 2 for p in positions], base, width, label="baseline (bare pyarrow)", color="#a0aec0")
    top = max(ferry + base)
    for p, r, f, b in zip(positions, rows, ferry, base):
        ratio = r.get("ratio")
        if ratio is None and b:
            ratio = f / b
        if ratio is not None:
            ax.text(p, max(f, b) + top * 0.02, f"x{ratio:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(positions)
    ax.set_xticklabels([label(r) for r in rows], fontsize=8)
    ax.set_ylabel("rows/s (median)")
    ax.set_ylim(0, top * 1.15)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: human(value)))
    # Above the axes, so it never hides a bar or a ratio.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    first = rows[0]
    subtitle = ", ".join(
        f"{k} {first.get(k)}" for k in ("parallel", "batch_size", "cpu_count") if not varies.get(k) and first.get(k)
    )
    default_title = f"Ferry vs bare pyarrow ({subtitle})" if subtitle else "Ferry vs bare pyarrow"
    fig.suptitle(title or default_title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON-lines file written by `python -m benchmarks ... --out FILE`")
    parser.add_argument("png", help="PNG file to write (its folder is created)")
    parser.add_argument("--title", help="chart title")
    args = parser.parse_args(argv)
    try:
        records = load_results(args.results)
        path = plot_results(records, args.png, title=args.title)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({len(latest(records))} measurement(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
