import math
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from litgpt.config import Config
from torch.utils.data import DataLoader, Dataset

from lightning_msign.litgpt_module import LitGPTModule, build_config, lr_schedule_factor

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]


TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "rotary_percentage": 0.0, "bias": False}


def tiny_module(**kwargs: Any) -> LitGPTModule:
    kwargs.setdefault("vocab_size", 32)
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("warmup_steps", 2)
    return LitGPTModule(dict(TINY), **kwargs)


class CountingDataset(Dataset):
    """Learnable token windows: ``x[t + 1] = (x[t] + 1) % vocab``, a random start per sample."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=generator)
        self.tokens = (starts + torch.arange(seq_len + 1)) % vocab  # (n, seq_len + 1)

    def __len__(self) -> int:
        return self.tokens.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "targets": self.tokens[i, 1:]}


class RecordingLogger(CSVLogger):
    """CSVLogger that also keeps every ``log_metrics`` call in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[Optional[int], dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.calls.append((step, dict(metrics)))
        super().log_metrics(metrics, step)

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.calls if key in m]


def make_trainer(tmp_path, **kwargs: Any) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=RecordingLogger(tmp_path, name="test"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(default_root_dir=tmp_path, **defaults)


def loaders(batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(CountingDataset(64), batch_size=batch_size, shuffle=True),
        DataLoader(CountingDataset(16), batch_size=batch_size),
    )


# --------------------------------------------------------------------------- config


def test_model_config_from_name():
    module = LitGPTModule("pythia-14m", vocab_size=256, block_size=32)
    reference = Config.from_name("pythia-14m")
    assert module.config.n_layer == reference.n_layer
    assert module.config.n_embd == reference.n_embd
    assert module.config.padded_vocab_size == module.config.vocab_size == 256
    assert module.model.lm_head.out_features == 256
    assert module.config.block_size == module.model.max_seq_length == 32
    assert module.hparams.model_config == "pythia-14m"


def test_model_config_from_dict():
    module = LitGPTModule(dict(TINY))
    # Without an override a bare Config pads the vocabulary to a multiple of 512.
    assert module.config.padded_vocab_size == 50688
    assert module.config.n_layer == 2 and module.config.n_embd == 32
    assert module.hparams.model_config == TINY


def test_model_config_object_is_stored_as_dict():
    config = Config(**TINY)
    module = LitGPTModule(config, vocab_size=64)
    assert isinstance(module.hparams.model_config, dict)
    assert isinstance(module.hparams_initial["model_config"], dict)
    assert module.hparams.model_config["n_layer"] == 2
    # the Config passed in is not modified by the override
    assert config.padded_vocab_size == 50688
    assert module.config.padded_vocab_size == 64
    assert Config(**module.hparams.model_config) == config


@pytest.mark.parametrize("vocab_size", [10, 256, 4096])
@pytest.mark.parametrize("block_size", [8, 100])
def test_vocab_and_block_overrides(vocab_size, block_size):
    module = LitGPTModule(dict(TINY, padding_multiple=512), vocab_size=vocab_size, block_size=block_size)
    assert module.config.vocab_size == module.config.padded_vocab_size == vocab_size
    assert module.model.transformer.wte.num_embeddings == vocab_size
    assert module.model.lm_head.out_features == vocab_size
    assert module.config.block_size == block_size
    logits = module(torch.randint(0, vocab_size, (2, block_size)))
    assert logits.shape == (2, block_size, vocab_size)


def test_build_config_does_not_mutate_inputs():
    d = dict(TINY)
    build_config(d, vocab_size=7, block_size=9)
    assert d == TINY


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize(
    ("n_head", "n_query_groups"),
    [(4, None), (4, 2), (4, 1)],
    ids=["mha", "gqa", "mqa"],
)
def test_zero_init_query_zeroes_exactly_the_q_rows(n_head, n_query_groups):
    config = dict(TINY, n_embd=64, n_head=n_head, n_query_groups=n_query_groups, bias=True)
    module = LitGPTModule(config, vocab_size=32, block_size=16, zero_init_query=True)
    cfg = module.config
    q_size = cfg.n_head * cfg.head_size
    kv_size = cfg.n_query_groups * cfg.head_size
    for block in module.model.transformer.h:
        weight = block.attn.qkv.weight  # (q + 2 kv, n_embd)
        assert weight.shape[0] == q_size + 2 * kv_size
        assert torch.count_nonzero(weight[:q_size]) == 0
        # every K and V row keeps its random init
        assert (weight[q_size:].norm(dim=1) > 0).all()
        assert torch.count_nonzero(block.attn.qkv.bias[:q_size]) == 0
    # no other weight is zeroed
    assert (module.model.transformer.h[0].attn.proj.weight.norm(dim=1) > 0).all()


def test_zero_init_query_forward_gives_uniform_attention_scores():
    module = tiny_module(zero_init_query=True)
    x = module.model.transformer.h[0].norm_1(torch.randn(1, 5, 32))
    q = module.model.transformer.h[0].attn.qkv(x)[..., :32]
    assert torch.count_nonzero(q) == 0


def test_scale_residual_init_divides_output_projections():
    seed_everything(0)
    plain = tiny_module(init_std=0.02)
    seed_everything(0)
    scaled = tiny_module(init_std=0.02, scale_residual_init=True)
    scale = 1 / math.sqrt(2 * 2)
    plain_params = dict(plain.named_parameters())
    for name, param in scaled.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            torch.testing.assert_close(param, plain_params[name] * scale)
        else:
            torch.testing.assert_close(param, plain_params[name])


@pytest.mark.parametrize("init_std", [None, 0.08])
def test_init_std(init_std):
    seed_everything(0)
    module = LitGPTModule(dict(TINY, n_embd=128, n_head=4), vocab_size=512, block_size=16, init_std=init_std)
    expected = 0.02 if init_std is None else init_std
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            assert param.std().item() == pytest.approx(expected, rel=0.1), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(param) == 0
        else:  # norm weights
            assert torch.all(param == 1)


# --------------------------------------------------------------------------- optimizer


def test_param_groups_multipliers_and_weight_decay():
    module = tiny_module(lr=1e-3, weight_decay=0.05, lr_mult_2d=16.0, lr_mult_embedding=4.0, max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"weights", "embeddings", "no_decay"}
    names = {id(p): n for n, p in module.named_parameters()}
    group_names = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}

    assert group_names["embeddings"] == {"model.transformer.wte.weight", "model.lm_head.weight"}
    assert all(module.get_parameter(n).ndim >= 2 for n in group_names["weights"])
    assert {"model.transformer.h.0.attn.qkv.weight", "model.transformer.h.1.mlp.proj.weight"} <= group_names["weights"]
    assert all(module.get_parameter(n).ndim < 2 for n in group_names["no_decay"])
    # every parameter in exactly one group
    assert sum(len(v) for v in group_names.values()) == len(names)
    assert set().union(*group_names.values()) == set(names.values())

    assert groups["weights"]["initial_lr"] == pytest.approx(16e-3)
    assert groups["embeddings"]["initial_lr"] == pytest.approx(4e-3)
    assert groups["no_decay"]["initial_lr"] == pytest.approx(1e-3)
    assert groups["weights"]["weight_decay"] == groups["embeddings"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["weights"]["betas"] == (0.9, 0.95)


def test_param_groups_with_biases():
    module = LitGPTModule(dict(TINY, bias=True), vocab_size=32, block_size=16)
    groups = {g["name"]: g for g in module.param_groups()}
    biases = [p for n, p in module.named_parameters() if n.endswith("bias")]
    assert biases and all(any(b is p for p in groups["no_decay"]["params"]) for b in biases)


def test_lr_schedule_factor_shapes():
    f = lr_schedule_factor
    # warm-up: linear from 1/W to 1
    assert [f(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 20, "linear") == 1.0
    assert f(12, 4, 20, "linear", 0.1) == pytest.approx(0.55)
    assert f(12, 4, 20, "cosine", 0.1) == pytest.approx(0.55)  # midpoint of the cosine
    assert f(8, 4, 20, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    for decay in ("linear", "cosine"):
        assert f(20, 4, 20, decay, 0.1) == pytest.approx(0.1)
        assert f(1000, 4, 20, decay, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert f(15, 4, 20, "constant", 0.1) == 1.0
    assert f(0, 0, 10, "linear", 0.0) == 1.0  # no warm-up


@pytest.mark.parametrize("lr_decay", ["linear", "cosine", "constant"])
def test_scheduler_follows_schedule(lr_decay):
    lr, warmup, max_steps = 1e-2, 5, 25
    module = tiny_module(lr=lr, warmup_steps=warmup, max_steps=max_steps, lr_decay=lr_decay, min_lr_ratio=0.2)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(max_steps + 5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(lr / warmup)
    assert max(lrs) == pytest.approx(lr)
    assert lrs[warmup - 1] == pytest.approx(lr)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    after = lrs[warmup - 1 :]
    if lr_decay == "constant":
        assert all(v == pytest.approx(lr) for v in after)
    else:
        assert all(a >= b for a, b in zip(after, after[1:]))
        assert lrs[max_steps] == pytest.approx(0.2 * lr)
        assert lrs[-1] == pytest.approx(0.2 * lr)


def test_max_steps_defaults_to_estimated_stepping_batches(tmp_path):
    module = tiny_module(lr=1e-2, warmup_steps=2, lr_decay="linear", min_lr_ratio=0.1)
    train, _ = loaders()
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(module, train)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 6
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_infinite_training_without_max_steps_raises(tmp_path):
    module = tiny_module()
    train, _ = loaders()
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match="`max_steps` must be set"):
        trainer.fit(module, train)


# --------------------------------------------------------------------------- training


def test_fit_reduces_loss_and_logs(tmp_path):
    seed_everything(0)
    module = tiny_module(lr=3e-3, warmup_steps=5, scale_residual_init=True)
    train, val = loaders()
    trainer = make_trainer(tmp_path, max_steps=40, val_check_interval=8, limit_val_batches=2, gradient_clip_val=1.0)
    trainer.fit(module, train, val)
    losses = trainer.logger.values("train/loss")
    assert len(losses) == 40
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    val_losses = trainer.logger.values("val/loss")
    assert len(val_losses) == 5 and val_losses[-1] < val_losses[0]
    assert not trainer.logger.values("train/z_loss")


def test_z_loss_is_added_and_logged(tmp_path):
    class CheckLoss(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            torch.testing.assert_close(outputs["loss"], metrics["train/loss"] + metrics["train/z_loss"])

    module = tiny_module(z_loss=1e-2)
    train, _ = loaders()
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[CheckLoss()])
    trainer.fit(module, train)
    z = trainer.logger.values("train/z_loss")
    assert len(z) == 3 and all(v > 0 for v in z)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_tuple_batches_are_accepted():
    module = tiny_module()
    x = torch.randint(0, 32, (2, 16))
    loss_tuple = module.training_step((x, x), 0)
    loss_dict = module.training_step({"input_ids": x, "targets": x}, 0)
    torch.testing.assert_close(loss_tuple, loss_dict)
    with pytest.raises(ValueError, match="`batch`"):
        module.training_step({"tokens": x}, 0)


@pytest.mark.parametrize("as_config", [False, True], ids=["dict", "Config"])
def test_checkpoint_roundtrip(tmp_path, as_config):
    model_config = Config(**TINY) if as_config else dict(TINY)
    module = LitGPTModule(
        model_config, vocab_size=32, block_size=16, lr=2e-3, zero_init_query=True, warmup_steps=1, max_steps=3
    )
    train, _ = loaders()
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, train)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = LitGPTModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.config == module.config
    assert loaded.lr == 2e-3 and loaded.zero_init_query
    assert isinstance(loaded.hparams.model_config, dict)
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    x = torch.randint(0, 32, (2, 16))
    module.eval()
    loaded.eval()
    torch.testing.assert_close(module(x), loaded(x))

    # resume continues the schedule where it stopped
    resumed = make_trainer(tmp_path, max_steps=5, limit_val_batches=0)
    resumed.fit(LitGPTModule.load_from_checkpoint(path), train, ckpt_path=path)
    assert resumed.global_step == 5


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"model_config": "no-such-model"}, "model_config"),
        ({"model_config": {"n_layer": 2, "n_embd": 30, "n_head": 4}}, "model_config"),
        ({"model_config": {"n_layers": 2}}, "model_config"),
        ({"model_config": 3}, "model_config"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"block_size": -1}, "block_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0}, "eps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"warmup_steps": 50, "max_steps": 10}, "warmup_steps"),
        ({"lr_decay": "exponential"}, "lr_decay"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"max_steps": 0}, "max_steps"),
        ({"init_std": 0.0}, "init_std"),
        ({"lr_mult_2d": -1.0}, "lr_mult_2d"),
        ({"lr_mult_embedding": float("inf")}, "lr_mult_embedding"),
        ({"z_loss": -1e-4}, "z_loss"),
        ({"compile": "yes"}, "compile"),
        ({"compile": 1}, "compile"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, name):
    kwargs = {"model_config": dict(TINY), "vocab_size": 32, "block_size": 16, **kwargs}
    model_config = kwargs.pop("model_config")
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        LitGPTModule(model_config, **kwargs)
    bad = kwargs.get(name, model_config)
    assert repr(bad)[:10] in str(info.value)


def test_is_a_lightning_module():
    assert issubclass(LitGPTModule, LightningModule)


def test_arguments_are_kept_once_in_hparams():
    module = tiny_module(lr=2e-3, betas=[0.8, 0.9], compile=False, optimizer="adamw")
    assert (module.lr, module.betas, module.compile_model, module.optimizer_name) == (2e-3, (0.8, 0.9), False, "adamw")
    module.lr = 5e-3  # what Lightning's lr_find does: the hyperparameter itself changes
    assert module.hparams["lr"] == 5e-3 and module.lr == 5e-3
    assert not {"lr", "betas", "warmup_steps", "max_steps"} & set(vars(module))  # no second copy on the instance
