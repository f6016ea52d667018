"""The Lightning callbacks are adapters: one signature (the guard's), built from code or from YAML alike."""

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

import lightning_msign
from lightning_msign import (
    PSS,
    Curvature,
    CurvatureMonitor,
    DepthWarmup,
    DepthWarmupCallback,
    Diagnostics,
    DiagnosticsMonitor,
    MSign,
    MSignCallback,
    PSSCallback,
    QKNormRetrofit,
    QKNormRetrofitCallback,
    Rollback,
    RollbackCallback,
    StableRank,
    StableRankMonitor,
)
from lightning_msign.callbacks.base import GuardCallback, guard_options
from lightning_msign.cli import MSignCLI
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.litgpt_module import LitGPTModule

from conftest import tiny_data, tiny_module, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(MSign, MSignCallback), (PSS, PSSCallback), (StableRank, StableRankMonitor), (Diagnostics, DiagnosticsMonitor),
         (Curvature, CurvatureMonitor), (DepthWarmup, DepthWarmupCallback), (Rollback, RollbackCallback),
         (QKNormRetrofit, QKNormRetrofitCallback)]

# Every key of every callback, each set to a value other than its default where one is valid on the debug model (a
# 2-layer LitGPT of width 32): the fit below must see each of them arrive in its guard.
EVERY_KEY: dict[type[GuardCallback], dict[str, Any]] = {
    MSignCallback: dict(
        period=3, targets="qk", backend="polar_express", steps=4, split_qkv=True, log_stable_rank=False,
        layouts={"*.attn.proj.weight": "matrix"},
        max_attn_logit=1000.0, min_srank_fraction=0.01, max_grad_ratio=50.0, max_curvature_ratio=1000.0,
        check_every=2, min_spacing=3, warmup_steps=1, grad_alpha=0.2, probe_batch_size=2, probe_seq_len=16,
        model_attr="model", period_after_trigger=5, logits_from="second_forward",
    ),
    PSSCallback: dict(
        tau=3.0, alpha=0.2, warmup_steps=2, targets="attention", smoothing="softmax",
        smoothing_kwargs={"temperature": 2.0},
        rank=2, max_rank=4, cooldown_steps=3, action="smooth_and_skip", skip_nonfinite=False, split_qkv=False,
        power_iters=3, log_every_n_steps=2, layouts={"*.attn.proj.weight": "matrix"}, adapt_after=None,
    ),
    StableRankMonitor: dict(
        targets="attention", every_n_steps=2, mode="exact", power_iters=2, warmup_iters=5, split_qkv=False,
        log_per_matrix=False, log_grad_norm=False, log_norms=True, layouts={"*.attn.proj.weight": "matrix"},
    ),
    DiagnosticsMonitor: dict(
        every_n_steps=2, jacobian=True, jacobian_iters=3, attention_logits=False, output_logits=False,
        max_batch_size=2, max_seq_len=16, model_attr="model", seed=3,
    ),
    CurvatureMonitor: dict(
        every_n_steps=2, iterations=2, cold_iterations=3, targets="attention", max_gap=10, seed=4, method="power",
        loss_fn="test_adapters:mean_loss",
    ),
    DepthWarmupCallback: dict(
        start_fraction=1.0, groups=1, interval=2, start_step=1, order="interleave", blocks_attr="model.transformer.h",
        output_projections=["attn.proj", "mlp.proj"], curvature_margin=None, max_defer_steps=None,
    ),
    RollbackCallback: dict(
        snapshot_every=2, keep=3, snapshot_device="cpu", window=16, z_threshold=None, min_history=4,
        watch=["loss"], max_retries=2, lr_factor=0.5, lr_steps=2, lr_ramp_steps=1, repair_msign="qk",
        restart_moments="qk", msign_backend="svd", on_pss_trigger=True, max_curvature_ratio=1000.0,
        skipped_path="skipped.json",
    ),
    QKNormRetrofitCallback: dict(
        max_attn_logit=1000.0, scope="layer", check_every=2, probe_batch_size=2, probe_seq_len=16, model_attr="model",
    ),
}

def mean_loss(pl_module, batch):
    """A ``loss_fn`` for CurvatureMonitor, named by import path in the YAML."""
    return pl_module.curvature_loss(batch)


def stored(callback: GuardCallback, key: str) -> Any:
    """What the guard (or, for an adapter option, the callback) holds for ``key``, in YAML's terms."""
    owner = callback if key not in {p.name for p in guard_options(callback.guard_class, callback.guard_runtime)} \
        else callback.guard
    assert hasattr(owner, key), f"{type(owner).__name__} keeps no attribute `{key}`"
    value = getattr(owner, key)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def expected(key: str, value: Any) -> Any:
    return [value] if key in {"targets", "repair_msign", "restart_moments"} and isinstance(value, str) else value


@pytest.mark.parametrize(("guard_class", "callback_class"), PAIRS, ids=lambda c: c.__name__)
def test_the_callback_signature_is_the_guards(guard_class, callback_class):
    """Every guard option, with its type and default, in the guard's order; then the adapter's own, keyword-only."""
    callback_params = list(inspect.signature(callback_class).parameters.values())
    options = guard_options(guard_class, callback_class.guard_runtime)
    assert callback_params[:len(options)] == options
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in callback_params[len(options):])
    assert set(EVERY_KEY[callback_class]) == {p.name for p in callback_params}, "the YAML below sets every key"
    runtime = set(inspect.signature(guard_class.__init__).parameters) - {"self"} - {p.name for p in options}
    assert runtime == set(callback_class.guard_runtime)  # what the adapter supplies: module, optimizers, ...



@pytest.mark.parametrize(("guard_class", "callback_class"), PAIRS, ids=lambda c: c.__name__)
def test_the_callback_documents_the_guards_arguments_but_not_the_supplied_ones(guard_class, callback_class):
    """The constructor's docstring (LightningCLI's help, the API pages) is the guard's, less the entries of what the
    adapter supplies (``module:``, ``optimizers:``, ...), continuation lines included."""
    doc, guard_doc = callback_class.__init__.__doc__, guard_class.__doc__
    entries = lambda text: {m for m in re.findall(r"^ {8}(\w+): ", text, re.MULTILINE)}  # noqa: E731
    assert set(callback_class.guard_runtime) <= entries(guard_doc)
    assert entries(doc) == entries(guard_doc) - set(callback_class.guard_runtime)
    assert len(doc.splitlines()) < len(guard_doc.splitlines())
    assert doc.split("Args:")[0] == guard_doc.split("Args:")[0]

def test_options_are_taken_by_name_and_bad_ones_named():
    assert MSignCallback(7, "qk").guard.period == 7 and MSignCallback(7, "qk").guard.targets == ["qk"]
    with pytest.raises(TypeError, match="MSignCallback: got an unexpected keyword argument 'perod'"):
        MSignCallback(perod=3)
    with pytest.raises(ValueError, match="period"):
        MSignCallback(period=0)
    with pytest.raises(TypeError, match="RollbackCallback.from_guard needs a Rollback, got MSign"):
        RollbackCallback.from_guard(MSign(period=2))


def guards_in_code() -> list[GuardCallback]:
    """The eight pairs, each guard configured in code and handed to its callback."""
    return [
        MSignCallback.from_guard(MSign(period=2, targets="qk", backend="polar_express")),
        PSSCallback.from_guard(PSS(tau=2.5, warmup_steps=2)),
        StableRankMonitor.from_guard(StableRank(targets="attention", every_n_steps=2)),
        DiagnosticsMonitor.from_guard(Diagnostics(every_n_steps=2)),
        CurvatureMonitor.from_guard(Curvature(every_n_steps=2, iterations=2), loss_fn="test_adapters:mean_loss"),
        DepthWarmupCallback.from_guard(DepthWarmup(start_fraction=0.5, groups=1, interval=2, start_step=2)),
        RollbackCallback.from_guard(Rollback(snapshot_every=2, min_history=2), on_pss_trigger=True),
        QKNormRetrofitCallback.from_guard(QKNormRetrofit(max_attn_logit=1e6)),  # checks, never switches
    ]


def test_every_pair_runs_from_a_guard_configured_in_code(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0, verbose=False)
    callbacks = guards_in_code()
    guards = [cb.guard for cb in callbacks]
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=callbacks,
                                       logger=CSVLogger(str(tmp_path), name="logs")))
    trainer.fit(tiny_module(), tiny_data())
    assert [cb.guard for cb in callbacks] == guards  # the guards themselves ran, not copies
    assert all(g.last_step == 4 for g in guards), [g.last_step for g in guards]
    msign, _, srank, diag, curvature, warmup, rollback, retrofit = guards
    assert msign.applications == 2 and msign.trigger_steps == [] and msign.period == 2
    assert curvature.latest_stability_ratio is not None
    assert callbacks[5].active_blocks == warmup.active_blocks == tuple(range(len(warmup.blocks)))  # all unlocked
    assert rollback.snapshots and rollback.rollbacks == 0
    assert callbacks[-2].on_pss_trigger and callbacks[-2]._pss == [callbacks[1]]
    assert retrofit.switch_steps == [None] * 2 and retrofit.switched_layers == []
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"srank/min", "diag/attn_logit_max", "curvature/stability_ratio", "msign/applications"} <= set(header)


def test_every_key_of_every_callback_reaches_its_guard_from_yaml(tmp_path, monkeypatch):
    """`lightning-msign fit` with a YAML naming every key of the seven callbacks: each value lands in the guard."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-msign"])
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # loss_fn's module
    config = {"trainer": {"max_steps": 4, "callbacks": [
        {"class_path": f"lightning_msign.{cls.__name__}", "init_args": values} for cls, values in EVERY_KEY.items()
    ]}}
    config_file = tmp_path / "every_key.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(ROOT / "recipes" / "debug.yaml"), "--config", str(config_file),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--data.cache_dir", str(tmp_path / "cache")]
    # what `lightning-msign fit` runs (cli_main returns nothing to inspect)
    cli = MSignCLI(LitGPTModule, ShakespeareDataModule, auto_configure_optimizers=False, args=args)
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks if isinstance(cb, GuardCallback)}
    assert set(callbacks) == set(EVERY_KEY)
    for cls, values in EVERY_KEY.items():
        callback = callbacks[cls]
        assert callback.guard.last_step == 4, cls.__name__
        for key, value in values.items():
            assert stored(callback, key) == expected(key, value), f"{cls.__name__}.{key}"


def test_four_guards_reading_the_gradient_norm_compute_it_once_per_step(tmp_path):
    """PSS, MSign's gradient-ratio trigger, Rollback and StableRank: one computation (one collective) per step."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_msign.guards.signals import step_signals

    seed_everything(0, verbose=False)
    callbacks = [PSSCallback(warmup_steps=2), MSignCallback(period=None, max_grad_ratio=1e9, warmup_steps=1),
                 RollbackCallback(snapshot_every=2, min_history=2), StableRankMonitor(targets="attention")]
    module = tiny_module()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=callbacks, log_every_n_steps=1,
                                       logger=CSVLogger(str(tmp_path), name="logs")))
    trainer.fit(module, tiny_data())
    assert step_signals(module).computations == 6
    assert all(cb.guard.last_step == 6 for cb in callbacks)
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    import csv

    rows = list(csv.DictReader(metrics.open()))
    pss = [float(r["pss/grad_norm"]) for r in rows if r.get("pss/grad_norm")]
    total = [float(r["grad_norm/total"]) for r in rows if r.get("grad_norm/total")]
    assert len(pss) == len(total) == 6 and pss == total  # the same reading


def test_no_module_of_the_package_imports_another_modules_private_names():
    import ast

    package = Path(lightning_msign.__file__).resolve().parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_msign"):
                found += [f"{path.relative_to(package)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_readme_table_of_pairs_is_the_generated_one():
    from lightning_msign.callbacks import pairs_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("<!-- pairs:start -->\n", 1)[1].split("<!-- pairs:end -->", 1)[0]
    assert shown == pairs_table(), "README's table is stale: paste lightning_msign.callbacks.pairs_table()"
    assert shown.count("\n") == 2 + len(PAIRS)  # every pair the adapter tests check has its row


def test_the_functional_layer_imports_only_torch_the_standard_library_and_itself():
    import ast

    package = Path(lightning_msign.__file__).resolve().parent
    allowed = {"torch", "lightning_msign.functional", "lightning_msign._validation", "__future__"}
    found = []
    for path in sorted((package / "functional").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or any(name == a or name.startswith(a + ".") for a in allowed):
                    continue
                found.append(f"{path.name}:{node.lineno} {name}")
    assert not found, found


def test_renamed_callbacks_keep_their_old_names_and_checkpoint_keys(tmp_path, monkeypatch):
    """``ArchitectureWarmup`` / ``RollbackGuard`` (the names before the pairs read as pairs) still import, with a
    deprecation warning, as the renamed classes; a YAML naming them still builds them; and the state keys in a
    checkpoint are those the old classes wrote, so a run checkpointed before the rename resumes its callbacks."""
    from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning

    from lightning_msign import DepthWarmupCallback, RollbackCallback
    from lightning_msign.cli import MSignCLI

    with pytest.warns(LightningDeprecationWarning, match="`lightning_msign.ArchitectureWarmup` is now `DepthWarmup"):
        assert lightning_msign.ArchitectureWarmup is DepthWarmupCallback
    with pytest.warns(LightningDeprecationWarning, match="`lightning_msign.callbacks.RollbackGuard` is now `Rollback"):
        from lightning_msign.callbacks import RollbackGuard
    assert RollbackGuard is RollbackCallback
    with pytest.raises(AttributeError, match="has no attribute 'RollbackGuards'"):
        lightning_msign.RollbackGuards  # noqa: B018
    # Lightning's _generate_state_key of the old classes: f"{qualname}{kwargs!r}"
    assert RollbackCallback(snapshot_every=5).state_key == "RollbackGuard{'snapshot_every': 5, 'z_threshold': 6.0}"
    assert DepthWarmupCallback(groups=2).state_key == (
        "ArchitectureWarmup{'start_fraction': 0.5, 'groups': 2, 'interval': 500, 'order': 'stack'}")

    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning_msign.ArchitectureWarmup", "init_args": {"groups": 2}},
        {"class_path": "lightning_msign.RollbackGuard", "init_args": {"snapshot_every": 5}},
    ]}}))
    monkeypatch.setattr(sys, "argv", ["lightning-msign"])
    args = ["--config", str(ROOT / "recipes" / "debug.yaml"), "--config", str(config), "--data.cache_dir",
            str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.warns(LightningDeprecationWarning, match="is now `DepthWarmupCallback`"):
        cli = MSignCLI(LitGPTModule, ShakespeareDataModule, auto_configure_optimizers=False, run=False, args=args)
    built = [cb for cb in cli.trainer.callbacks if isinstance(cb, (DepthWarmupCallback, RollbackCallback))]
    assert [type(cb) for cb in built] == [DepthWarmupCallback, RollbackCallback]
    assert built[0].guard.groups == 2 and built[1].guard.snapshot_every == 5
