"""Ferry's benchmark harness: Ferry next to a bare-pyarrow baseline, one JSON line per measurement.

Run from the repository root::

    .venv/bin/python -m benchmarks --list
    .venv/bin/python -m benchmarks memory-to-parquet --rows 1000000 --repeat 3
    .venv/bin/python -m benchmarks.plot results.jsonl docs/benchmarks.png

Modules:

* :mod:`benchmarks.harness` -- measurement: the workspace, the Prefect
  environment, timing, medians, RSS sampling and the JSON lines.
* :mod:`benchmarks.routes` -- the registry of routes (a Ferry run and its
  baseline, plus optional preparation and service start-up).
* :mod:`benchmarks.plot` -- a PNG bar chart of a JSON-lines results file.

Importing this package (or ``routes``/``harness``) starts nothing and does not
import Prefect: Prefect must only be imported once ``PREFECT_HOME`` points at
the invocation's fresh folder (see :func:`benchmarks.harness.prepare_environment`).
See ``benchmarks/README.md`` for what every output field means.
"""
