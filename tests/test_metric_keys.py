"""Tests for :mod:`lightning_msign.metric_keys`: one registry, and the report reads nothing outside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import lightning_msign.report as report_package
from lightning_msign import metric_keys
from lightning_msign.report import PANELS, Panel, Run, render_report, summarize

REGISTRY = {name: value for name, value in vars(metric_keys).items() if name.isupper() and isinstance(value, str)}
KEYS = {value for name, value in REGISTRY.items() if not name.endswith("_PREFIX")}
PREFIXES = {value for name, value in REGISTRY.items() if name.endswith("_PREFIX")}
REPORT_DIR = Path(report_package.__file__).parent


def unregistered(keys) -> list[str]:
    """The keys of ``keys`` that are not full keys of the registry."""
    return sorted({k for k in keys if k not in KEYS})


def typed_keys(source: str) -> list[str]:
    """String literals of ``source``, docstrings aside, that spell a registered key or prefix.

    A key holding ``/`` counts anywhere in a literal (``f"final train/loss"``); one without (``epoch``) only
    as the whole literal.
    """
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            found += [k for k in KEYS | PREFIXES if (k in text if "/" in k else k == text)]
    return sorted(set(found))


def test_registry_is_unique_and_well_formed():
    values = list(REGISTRY.values())
    assert len(values) == len(set(values)), "two constants spell the same key"
    for name, value in REGISTRY.items():
        assert value == value.strip() and value, name
        assert value.endswith("/") == name.endswith("_PREFIX"), f"{name} = {value!r}: prefixes, and only they, end in /"
    for prefix in PREFIXES:  # every prefix belongs to a producer's namespace (srank/, msign/, pss/, diag/, ...)
        assert prefix.count("/") >= 1 and not prefix.startswith("/")
    assert metric_keys.per_matrix(metric_keys.SRANK_PREFIX, "h.0.attn.qkv.weight.q") == "srank/h.0.attn.qkv.weight.q"
    assert metric_keys.per_matrix(metric_keys.DIAG_JACOBIAN_ALIGNMENT_PREFIX, 3) == "diag/jacobian_alignment/3"
    with pytest.raises(ValueError, match="`prefix`.*'srank/min'"):
        metric_keys.per_matrix(metric_keys.SRANK_MIN, "x")


def test_strings_in_use_are_kept():
    """The keys logged before the registry existed: existing dashboards and logs depend on them."""
    K = metric_keys
    assert (K.TRAIN_LOSS, K.VAL_LOSS, K.TRAIN_Z_LOSS, K.TEST_LOSS) == (
        "train/loss", "val/loss", "train/z_loss", "test/loss"
    )
    assert (K.SRANK_PREFIX, K.SRANK_MIN, K.SRANK_MEAN, K.GRAD_NORM_TOTAL) == (
        "srank/", "srank/min", "srank/mean", "grad_norm/total"
    )
    assert (K.MSIGN_APPLICATIONS, K.MSIGN_SRANK_BEFORE_PREFIX) == ("msign/applications", "msign/srank_before/")
    assert (K.PSS_GRAD_NORM, K.PSS_TRIGGERED) == ("pss/grad_norm", "pss/triggered")
    assert (K.DIAG_ATTN_LOGIT_MAX, K.DIAG_ATTN_LOGIT_MAX_PREFIX) == ("diag/attn_logit_max", "diag/attn_logit_max/")


def documented_keys() -> set[str]:
    """The keys of the documented "Logged metrics" table (docs/metrics.md), ``<matrix>`` and the like cut back to
    their prefix."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text(encoding="utf-8")
    table = text.split("# Logged metrics", 1)[1].split("\n#", 1)[0]
    keys = set()
    for token in re.findall(r"`([a-z_]+/[a-z0-9_/<>{},]*)`", table):
        token = re.sub(r"<[a-z]+>$", "", token)  # srank/<matrix> -> srank/
        braces = re.search(r"\{([a-z_,]+)\}", token)
        options = braces.group(1).split(",") if braces else [""]
        keys.update(token.replace(braces.group(0), o) if braces else token for o in options)
    return keys


def test_every_documented_key_is_registered():
    documented = documented_keys()
    assert {"train/loss", "srank/", "msign/srank_before_min", "diag/attn_logit_max/"} <= documented
    assert sorted(documented - set(REGISTRY.values())) == []


def test_every_panel_key_is_registered():
    assert PANELS
    keys = [k for panel in PANELS for k in panel.all_keys] + [panel.ylabel for panel in PANELS if "/" in panel.ylabel]
    assert unregistered(keys) == []
    # the check can fail: a panel drawing a key typed by hand, not in the registry
    assert unregistered(Panel("Typed", "typed", ("srank/minimum",)).all_keys) == ["srank/minimum"]


class RecordingRun(Run):
    """A run that records every key the report asks it for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def series(self, key: str):
        self.asked.add(key)
        return super().series(key)

    def first_key(self, keys) -> Optional[str]:
        self.asked.update(keys)
        return super().first_key(keys)


def test_summary_and_rendering_ask_only_registered_keys(tmp_path):
    steps = np.arange(4)
    run = RecordingRun("r", tmp_path, "csv", {metric_keys.TRAIN_LOSS: (steps, np.linspace(3.0, 2.0, 4))})
    summarize(run)
    assert run.asked and unregistered(run.asked) == []
    asked_by_summary = set(run.asked)
    render_report([run], tmp_path / "out")
    assert run.asked >= asked_by_summary and unregistered(run.asked) == []
    # the check can fail: a reader asking for a key typed by hand
    run.series("grad_norm/totl")
    assert unregistered(run.asked) == ["grad_norm/totl"]


@pytest.mark.parametrize("path", sorted(REPORT_DIR.glob("*.py")), ids=lambda p: p.name)
def test_report_types_no_key(path):
    """Outside docstrings, the report spells no key: it imports them from :mod:`lightning_msign.metric_keys`."""
    assert typed_keys(path.read_text(encoding="utf-8")) == []


def test_typed_key_check_can_fail():
    source = '''
"""Docstrings may name ``train/loss``."""
LABEL = f"final val/loss {x}"
KEY = "epoch"
TEXT = "the epoch ends"
'''
    assert typed_keys(source) == ["epoch", "val/loss"]
