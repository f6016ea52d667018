"""``lightning-msign report RUN_DIR [RUN_DIR ...] --out DIR``: the command line of the report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from lightning_msign.report.render import render_report
from lightning_msign.report.runs import load_run
from lightning_msign.report.summary import verdict

__all__ = ["report_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-msign report",
        description=(
            "Draw several runs side by side (loss, gradient norm, min stable rank, attention-logit max,"
            " Jacobian alignment, with MSign applications and PSS triggers marked) and write"
            " report.png and a self-contained report.html into --out."
        ),
        epilog=(
            "RUN_DIR: a CSVLogger or TensorBoardLogger version folder, a metrics.csv or"
            " events.out.tfevents.* file, or a folder holding one run (its newest version is read)."
            " Example: lightning-msign report logs/csv/shakespeare-baseline logs/csv/shakespeare-msign"
            " --out reports/msign"
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="log folder or file of a run")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--label",
        action="append",
        metavar="LABEL",
        help="name of a run in the report; give it once per RUN_DIR, in the same order (default: from the path)",
    )
    parser.add_argument("--title", default="lightning-msign report", help="figure and page title")
    return parser


def report_main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``lightning-msign report``; prints the two written paths and, for several runs, a one-line verdict
    comparing the last run with the first (:func:`~lightning_msign.report.summary.verdict`).

    Args:
        argv: the arguments after ``report`` (``None``: ``sys.argv[2:]``).

    Returns:
        None (exit status 0).

    Raises:
        SystemExit: status 0 for ``--help``; status 2, after printing the usage and the reason to
            stderr, for bad arguments or input (a missing folder, no metrics, several runs in one folder,
            ``--label`` given a different number of times than there are runs).
    """
    parser = _parser()
    args = parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    if args.label is not None and len(args.label) != len(args.runs):
        parser.error(f"--label was given {len(args.label)} times for {len(args.runs)} runs; give it once per RUN_DIR")
    runs = []
    try:
        for i, path in enumerate(args.runs):
            run = load_run(path, label=None if args.label is None else args.label[i])
            for note in run.notes:
                print(f"lightning-msign report: note: {run.name}: {note}", file=sys.stderr)
            runs.append(run)
        png_path, html_path = render_report(runs, args.out, title=args.title)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(png_path)
    print(html_path)
    if len(runs) > 1:
        print(verdict(runs))
