"""The report's panels: which metric each one draws, its axis label and its scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightning_msign.metric_keys import (
    CURV_STABILITY_RATIO,
    DIAG_ATTN_LOGIT_MAX,
    DIAG_JACOBIAN_ALIGNMENT_MAX,
    DIAG_OUTPUT_LOGIT_MAX,
    GRAD_NORM_TOTAL,
    PSS_GRAD_NORM,
    SRANK_MIN,
    TRAIN_LOSS,
    VAL_LOSS,
    WARMUP_ACTIVE_BLOCKS,
)

__all__ = ["PANELS", "Panel"]


@dataclass(frozen=True)
class Panel:
    """One panel of the report.

    Args:
        title: panel title.
        ylabel: y-axis label.
        keys: the metric drawn as a line; the first key a run has is used (a fallback chain).
        secondary: an optional second metric drawn dashed with circles in the same color.
        log: ``"positive"``: log scale when every finite value is positive; ``"spread"``: log scale
            when values are positive and span more than two decades; ``"never"``.
        reference: an optional constant drawn as a dotted horizontal line (a threshold), labelled
            ``reference_label`` in the legend.
    """

    title: str
    ylabel: str
    keys: tuple[str, ...]
    secondary: Optional[str] = None
    log: str = "never"
    reference: Optional[float] = None
    reference_label: str = ""

    @property
    def all_keys(self) -> tuple[str, ...]:
        return self.keys + ((self.secondary,) if self.secondary else ())


LOSS_PANEL = Panel("Loss", "loss", (TRAIN_LOSS,), secondary=VAL_LOSS, log="spread")
#: ``StableRankMonitor``'s norm, else the one ``PSSCallback`` watches.
GRAD_NORM_PANEL = Panel("Gradient norm", "gradient norm", (GRAD_NORM_TOTAL, PSS_GRAD_NORM), log="positive")
SRANK_PANEL = Panel("Min stable rank", SRANK_MIN, (SRANK_MIN,))
ATTN_LOGIT_PANEL = Panel(
    "Attention-logit max", "max logit", (DIAG_ATTN_LOGIT_MAX,), secondary=DIAG_OUTPUT_LOGIT_MAX, log="positive"
)
JACOBIAN_PANEL = Panel("Jacobian alignment", "max alignment", (DIAG_JACOBIAN_ALIGNMENT_MAX,))
#: ``CurvatureMonitor``: the preconditioned curvature of the step over Adam's edge of stability (1 = the edge).
CURVATURE_PANEL = Panel(
    "Curvature / edge of stability", "stability ratio", (CURV_STABILITY_RATIO,), log="positive", reference=1.0,
    reference_label="edge of stability (stability ratio 1)",
)
#: ``DepthWarmupCallback``: blocks computing (the others are the identity).
WARMUP_PANEL = Panel("Active blocks", "active blocks", (WARMUP_ACTIVE_BLOCKS,))

#: The panels in drawing order, top to bottom.
PANELS: tuple[Panel, ...] = (
    LOSS_PANEL, GRAD_NORM_PANEL, SRANK_PANEL, ATTN_LOGIT_PANEL, JACOBIAN_PANEL, CURVATURE_PANEL, WARMUP_PANEL,
)
