import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_msign.cli import MSignCLI, cli_main
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.litgpt_module import LitGPTModule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
DEBUG = ROOT / "recipes" / "debug.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and ``sys.argv`` (pytest's own) carry arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-msign"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One token cache for the whole file (byte tokenization of the corpus takes a second)."""
    return str(tmp_path_factory.mktemp("cache"))


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (metrics_file,) = log_dir.rglob("metrics.csv")
    with open(metrics_file, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def debug_args(tmp_path: Path, cache_dir: str, subcommand: str = "fit") -> list[str]:
    return [
        subcommand,
        "--config",
        str(DEBUG),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--data.cache_dir",
        cache_dir,
    ]


def test_recipes_exist():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"debug.yaml", "shakespeare/baseline.yaml", "shakespeare/msign.yaml"} <= names


def build_cli(args: list[str], cache_dir: str) -> MSignCLI:
    """The project's CLI, parsed and instantiated without running a subcommand."""
    return MSignCLI(
        LitGPTModule,
        ShakespeareDataModule,
        auto_configure_optimizers=False,
        run=False,
        args=[*args, "--data.cache_dir", cache_dir],
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(recipe), "--print_config"])
    assert info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_config"]
    assert "vocab_size" not in printed["model"] and "block_size" not in printed["model"]
    assert isinstance(printed["seed_everything"], int) and not isinstance(printed["seed_everything"], bool)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_instantiates(recipe, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(recipe)], cache_dir)
    config = cli.model.config
    assert config.padded_vocab_size == cli.datamodule.vocab_size
    assert config.block_size == cli.datamodule.seq_len
    assert cli.trainer.max_steps > 0
    assert cli.trainer.gradient_clip_val is not None
    with open(recipe) as f:
        raw = yaml.safe_load(f)
    assert raw["trainer"]["logger"], "recipes log somewhere"


def test_every_recipe_key_is_commented():
    """Every leaf key has a comment line right above it stating its type (LitGPT's config style)."""
    for recipe in RECIPES:
        lines = recipe.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "- ")):
                continue  # comments, and list items (class_path entries)
            key, _, value = stripped.partition(":")
            if not value.strip() or key == "class_path":
                continue  # a mapping whose children carry the comments
            previous = lines[i - 1].strip()
            assert previous.startswith("#") and "type:" in previous, f"{recipe.name}:{i + 1} {stripped!r}"


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("msign", {"lightning_msign.MSignCallback", "lightning_msign.StableRankMonitor"}),
        ("pss", {"lightning_msign.PSSCallback", "lightning_msign.StableRankMonitor"}),
        ("msign_pss",
         {"lightning_msign.MSignCallback", "lightning_msign.PSSCallback", "lightning_msign.StableRankMonitor"}),
        ("arch_warmup", {"lightning_msign.CurvatureMonitor", "lightning_msign.DepthWarmupCallback"}),
        ("rollback", {"lightning_msign.RollbackCallback"}),
    ],
)
def test_method_recipes_differ_from_baseline_only_by_callbacks(recipe, expected):
    baseline = yaml.safe_load((ROOT / "recipes/shakespeare/baseline.yaml").read_text())
    msign = yaml.safe_load((ROOT / f"recipes/shakespeare/{recipe}.yaml").read_text())
    baseline_callbacks = baseline["trainer"].pop("callbacks")
    msign_callbacks = msign["trainer"].pop("callbacks")
    for run in (baseline, msign):
        run["trainer"]["logger"] = [
            {**lg, "init_args": {k: v for k, v in lg["init_args"].items() if k != "name"}}
            for lg in run["trainer"]["logger"]
        ]
    assert baseline == msign
    assert [c for c in msign_callbacks if "lightning_msign" not in c["class_path"]] == baseline_callbacks
    assert {c["class_path"] for c in msign_callbacks if "lightning_msign" in c["class_path"]} == expected


def test_debug_recipe_fit_end_to_end(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    cli_main(debug_args(tmp_path, cache_dir))

    rows = read_metrics(tmp_path / "logs")
    losses = column(rows, "train/loss")
    assert len(losses) == 20
    assert losses[-1] < losses[0]
    assert len(column(rows, "val/loss")) == 2
    assert column(rows, "lr/weights")
    assert column(rows, "srank/min")
    assert column(rows, "msign/applications")[-1] == 4.0  # after steps 5, 10, 15, 20
    (config_file,) = (tmp_path / "logs").rglob("config.yaml")
    saved = yaml.safe_load(config_file.read_text())
    assert saved["data"]["cache_dir"] == cache_dir
    assert list((tmp_path / "logs").rglob("*.ckpt"))


def test_debug_recipe_validate_from_checkpoint(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    fit_dir = tmp_path / "fit"
    cli_main(
        debug_args(fit_dir, cache_dir)
        + ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--model.warmup_steps", "2"]
    )
    (ckpt,) = fit_dir.rglob("*.ckpt")
    # a CLI checkpoint reloads outside the CLI, with the linked sizes
    loaded = LitGPTModule.load_from_checkpoint(ckpt)
    assert loaded.config.padded_vocab_size == 256 and loaded.config.block_size == 64
    assert loaded.config.n_layer == 2

    validate_dir = tmp_path / "validate"
    cli_main(debug_args(validate_dir, cache_dir, "validate") + ["--ckpt_path", str(ckpt)])
    rows = read_metrics(validate_dir / "logs")
    assert len(column(rows, "val/loss")) == 1
    assert not column(rows, "train/loss")


def test_links_follow_the_data_module(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(DEBUG), "--data.seq_len", "32"], cache_dir)
    assert cli.model.config.block_size == 32
    assert cli.model.config.padded_vocab_size == 256
    assert cli.model.hparams.vocab_size == 256 and cli.model.hparams.block_size == 32


def test_linked_arguments_cannot_be_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(DEBUG), "--model.block_size", "8", "--print_config"])
    assert info.value.code not in (None, 0)


def test_bad_recipe_value_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="`lr`"):
        MSignCLI(
            LitGPTModule,
            ShakespeareDataModule,
            auto_configure_optimizers=False,
            run=False,
            args=["--config", str(DEBUG), "--model.lr", "-1", "--data.cache_dir", str(tmp_path)],
        )


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_msign", "fit", "--config", str(DEBUG), "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["model_config"]["n_layer"] == 2


@pytest.mark.parametrize("recipe", ["muon", "numuon"])
def test_optimizer_recipes_differ_from_baseline_only_by_the_optimizer(recipe):
    baseline = yaml.safe_load((ROOT / "recipes/shakespeare/baseline.yaml").read_text())
    other = yaml.safe_load((ROOT / f"recipes/shakespeare/{recipe}.yaml").read_text())
    assert other["model"].pop("optimizer") == recipe
    options = other["model"].pop("optimizer_options")
    assert ("rank_fraction" in options) == (recipe == "numuon")
    callbacks = other["trainer"].pop("callbacks")
    assert [c["class_path"] for c in callbacks if "lightning_msign" in c["class_path"]] == [
        "lightning_msign.StableRankMonitor"]
    assert [c for c in callbacks if "lightning_msign" not in c["class_path"]] == baseline["trainer"].pop("callbacks")
    for run in (baseline, other):
        run["trainer"]["logger"] = [
            {**lg, "init_args": {k: v for k, v in lg["init_args"].items() if k != "name"}}
            for lg in run["trainer"]["logger"]
        ]
    assert baseline == other


@pytest.mark.parametrize("recipe", ["muon", "numuon"])
def test_optimizer_recipes_build_their_optimizer(recipe, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(ROOT / f"recipes/shakespeare/{recipe}.yaml")], cache_dir)
    cli.model.max_steps = cli.trainer.max_steps  # the schedule's length, without a fitting Trainer
    optimizer = cli.model.configure_optimizers()["optimizer"]
    from lightning_msign.optim import Muon, NuMuon

    assert type(optimizer) is (Muon if recipe == "muon" else NuMuon)
    assert optimizer.param_groups[0]["use_muon"] and optimizer.param_groups[0]["layouts"][0] == "rows:q=256,k=256,v=256"


def test_progress_bar_counts_steps_not_epochs(tmp_path, cache_dir, monkeypatch, capsys):
    """A step-limited run (max_epochs=-1) shows 'Steps n/max_steps', not Lightning's 'Epoch 0/-2', also with
    gradient accumulation (steps, not batches)."""
    monkeypatch.chdir(tmp_path)
    cli_main([*debug_args(tmp_path, cache_dir), "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "3",
              "--trainer.accumulate_grad_batches", "2"])
    captured = capsys.readouterr()
    err = (captured.out + captured.err).replace("\r", "\n")
    assert "Steps: 100%" in err and "3/3" in err and "Epoch 0/-2" not in err and "6/6" not in err


def test_progress_bar_choice_is_kept(tmp_path, cache_dir, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_msign import StepProgressBar

    monkeypatch.chdir(tmp_path)
    run = ["--config", str(DEBUG), "--data.cache_dir", cache_dir]
    on = MSignCLI(LitGPTModule, ShakespeareDataModule, auto_configure_optimizers=False, run=False,
                  args=[*run, "--trainer.enable_progress_bar", "true"])
    assert type(on.trainer.progress_bar_callback) is StepProgressBar
    off = MSignCLI(LitGPTModule, ShakespeareDataModule, auto_configure_optimizers=False, run=False, args=run)
    assert off.trainer.progress_bar_callback is None
    named = MSignCLI(LitGPTModule, ShakespeareDataModule, auto_configure_optimizers=False, run=False,
                     args=[*run, "--trainer.enable_progress_bar", "true", '--trainer.callbacks+={"class_path":'
                           ' "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 2}}'])
    assert type(named.trainer.progress_bar_callback) is TQDMProgressBar  # the recipe's own, not replaced
    assert named.trainer.progress_bar_callback.refresh_rate == 2


def test_main_job_recipes_differ_only_by_the_guard():
    """`make train`'s two runs: the guarded recipe is the unguarded one plus one MSignCallback (and other names)."""
    plain = yaml.safe_load((ROOT / "recipes/shakespeare/high_lr.yaml").read_text())
    guarded = yaml.safe_load((ROOT / "recipes/shakespeare/high_lr_guarded.yaml").read_text())
    names = {lg["init_args"].pop("name") for run in (plain, guarded) for lg in run["trainer"]["logger"]}
    assert names == {"shakespeare-high-lr", "shakespeare-high-lr-guarded"}
    (guard,) = [c for c in guarded["trainer"]["callbacks"] if c["class_path"] == "lightning_msign.MSignCallback"]
    guarded["trainer"]["callbacks"].remove(guard)
    assert plain == guarded
    assert guard["init_args"]["period"] is None and guard["init_args"]["max_attn_logit"] > 0
    assert guard["init_args"]["targets"] == "qk"


def test_main_job_runs_both_recipes_and_reports_them(tmp_path, monkeypatch, cache_dir, capsys):
    """The Makefile's `train` target, shortened to 12 steps of a 2-layer model: two fits, then the report and its
    verdict. What the verdict says is read from the logs, not written down: the guard first applies at the first
    step whose logged logit passes the recipe's threshold (155 vs 100 at step 3 on the machines tried), and the
    verdict's count is the logged one."""
    monkeypatch.chdir(tmp_path)
    make = (ROOT / "Makefile").read_text()
    assert "recipes/shakespeare/high_lr.yaml" in make and "recipes/shakespeare/high_lr_guarded.yaml" in make
    short = ["--trainer.max_steps", "12", "--model.max_steps", "12", "--model.warmup_steps", "2",
             "--model.model_config.n_layer", "2", "--model.lr", "0.1", "--trainer.val_check_interval", "6",
             "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
             "--data.cache_dir", cache_dir]
    for recipe in ("high_lr", "high_lr_guarded"):
        cli_main(["fit", "--config", str(ROOT / f"recipes/shakespeare/{recipe}.yaml"), *short])
    capsys.readouterr()
    cli_main(["report", "logs/csv/shakespeare-high-lr", "logs/csv/shakespeare-high-lr-guarded", "--label", "unguarded",
              "--label", "guarded", "--out", "reports/high-lr"])
    printed = capsys.readouterr().out.splitlines()
    assert (tmp_path / "reports/high-lr/report.png").exists() and (tmp_path / "reports/high-lr/report.html").exists()
    assert printed[-1].startswith("guarded vs unguarded: final val loss ")
    rows = read_metrics(tmp_path / "logs/csv/shakespeare-high-lr-guarded")
    applied = column(rows, "msign/applications")
    assert applied and printed[-1].endswith(f"MSign applications {int(applied[-1])} vs 0")
    guarded = yaml.safe_load((ROOT / "recipes/shakespeare/high_lr_guarded.yaml").read_text())
    (guard,) = [c["init_args"] for c in guarded["trainer"]["callbacks"] if c["class_path"].endswith("MSignCallback")]
    logits = {int(r["step"]): float(r["msign/attn_logit_max"]) for r in rows if r.get("msign/attn_logit_max")}
    first_applied = min(int(r["step"]) for r in rows if r.get("msign/applications"))
    assert first_applied == min(s for s, v in logits.items() if v > guard["max_attn_logit"])


def test_config_names_a_shipped_recipe_and_a_bad_name_lists_them(tmp_path, monkeypatch):
    from lightning_msign.cli import ConfigError, resolve_configs

    monkeypatch.chdir(tmp_path)  # outside the checkout: "recipes/..." is no file here
    from lightning_msign.recipes import RECIPES_DIR, recipe_names

    assert (ROOT / "recipes").resolve() == RECIPES_DIR  # the checkout's recipes/ is the packaged folder
    assert recipe_names() == sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix() for p in RECIPES)
    expected = str(RECIPES_DIR / "shakespeare" / "high_lr.yaml")
    for name in ("shakespeare/high_lr", "shakespeare/high_lr.yaml", "recipes/shakespeare/high_lr.yaml"):
        assert resolve_configs(["fit", "--config", name]) == ["fit", "--config", expected]
    assert resolve_configs(["fit", "-c", "debug"]) == ["fit", "-c", str(RECIPES_DIR / "debug.yaml")]
    assert resolve_configs(["fit", "--config=debug"]) == ["fit", f"--config={RECIPES_DIR / 'debug.yaml'}"]
    kept = ["fit", "--config", str(DEBUG), "--config", "{trainer: {max_steps: 3}}", "--model.lr", "debug"]
    assert resolve_configs(kept) == kept  # an existing file, inline YAML and other options are left alone
    with pytest.raises(ConfigError, match=r"'shakespeare/hi_lr'.*shakespeare/high_lr_guarded"):
        resolve_configs(["fit", "--config", "shakespeare/hi_lr"])


def test_a_refused_value_or_recipe_name_is_one_line_on_stderr(tmp_path, cache_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: -1\n")
    for config, message in ((str(bad), "lightning-msign: error: LitGPTModule: `lr` must be a finite float in"
                                       " (0, inf), got -1.0"),
                            ("nope", "lightning-msign: error: --config 'nope': No such file and no shipped recipe")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*debug_args(tmp_path, cache_dir), "--config", config])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message), err
        assert not any("Traceback" in line for line in err)
    from lightning_msign.cli import ConfigError

    with pytest.raises(ConfigError) as raised:  # callers of MSignCLI keep the original exception
        build_cli(["--config", str(DEBUG), "--config", str(bad)], cache_dir)
    assert isinstance(raised.value.__cause__, ValueError)


@pytest.mark.slow
def test_the_built_wheel_runs_a_packaged_recipe_without_the_repository(tmp_path, cache_dir):
    """Build the wheel from the package's files alone, install it into a fresh venv that sees the pinned stack
    (the test venv's site-packages, behind the wheel's), and fit 2 steps of `--config debug` outside any checkout."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lightning_msign", src / "lightning_msign", ignore=shutil.ignore_patterns("__pycache__"))
    run = dict(capture_output=True, text=True, timeout=300)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("lightning_msign-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, **run)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, **run).stdout.strip()
    Path(site, "pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                "--no-index", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import lightning_msign; print(lightning_msign.__file__)"],
                           cwd=work, check=True, **run).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout
    fit = subprocess.run([str(venv / "bin" / "lightning-msign"), "fit", "--config", "debug",
                          "--trainer.max_steps", "2", "--data.cache_dir", cache_dir], cwd=work, **run)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "`max_steps=2` reached" in fit.stdout + fit.stderr
    assert list(work.rglob("metrics.csv")), "the packaged recipe's CSV logger wrote in the working directory"
