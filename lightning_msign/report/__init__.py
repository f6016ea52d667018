"""Side-by-side report of several runs: ``lightning-msign report RUN_DIR [RUN_DIR ...] --out DIR``.

Reads the logs the suite writes (``CSVLogger``'s ``metrics.csv`` and ``TensorBoardLogger``'s
``events.out.tfevents.*`` files) and writes ``report.png`` and ``report.html`` into one folder. The
HTML page is self-contained: the PNG is embedded as base64, the style is inline, nothing is fetched.

Panels (one per quantity, shared step axis, one color per run in every panel); a panel is drawn
only when at least one run logged its key, and its title names the runs that did not:

==========================  ======================================================================
panel                       keys
==========================  ======================================================================
loss                        ``train/loss`` (line), ``val/loss`` (dashed, circles)
gradient norm               ``grad_norm/total`` (``StableRankMonitor``), else ``pss/grad_norm``
min stable rank             ``srank/min``
attention-logit max         ``diag/attn_logit_max``; ``diag/output_logit_max`` dashed
Jacobian alignment          ``diag/jacobian_alignment_max``
==========================  ======================================================================

Events, in the run's color on every panel: MSign applications (the steps at which
``msign/applications`` was logged) as short ticks along the bottom edge, PSS triggers (steps with
``pss/triggered == 1``) as triangles along the top edge, one lane per run; the first non-finite
``train/loss``/``val/loss`` as a dashed vertical line. Steps are the loggers' step index, the one
``train/loss`` is logged at (``trainer.global_step`` before the optimizer step). Every key is read
from :mod:`lightning_msign.metric_keys`.

Modules: :mod:`~lightning_msign.report.runs` (reading a run), :mod:`~lightning_msign.report.panels`
(what each panel draws), :mod:`~lightning_msign.report.summary` (the summary table's numbers),
:mod:`~lightning_msign.report.figure` (the PNG), :mod:`~lightning_msign.report.page` (the HTML),
:mod:`~lightning_msign.report.render` (both, from runs), :mod:`~lightning_msign.report.cli`.

Example::

    lightning-msign report logs/csv/shakespeare-baseline logs/csv/shakespeare-msign --out reports/msign

    from lightning_msign.report import load_run, render_report

    runs = [load_run("logs/csv/shakespeare-baseline"), load_run("logs/tensorboard/shakespeare-msign")]
    png_path, html_path = render_report(runs, "reports/msign", title="MSign vs baseline")
"""

# The constants are importable from here too, as from the single module this package replaced.
from lightning_msign.report.cli import report_main
from lightning_msign.report.panels import PANELS, Panel
from lightning_msign.report.render import render_report
from lightning_msign.report.runs import CSV_NAME, EVENTS_MARK, SEARCH_DEPTH, Run, Series, load_run  # noqa: F401
from lightning_msign.report.summary import LOSS_KEYS, MSIGN_KEY, PSS_KEY, summarize, verdict  # noqa: F401

__all__ = ["PANELS", "Panel", "Run", "load_run", "render_report", "report_main", "summarize", "verdict"]
