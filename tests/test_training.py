"""The shared training loop: optimizer groups, schedule, checkpoints, exact resume, EMA, DDP."""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from procs import sigkill_at_marker
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.config import ContrastiveConfig, DiffusionConfig
from pipeline.dist import DistEnv
from pipeline.errors import PipelineError
from pipeline.tracking import Tracker
from pipeline.training import (
    EMA,
    TrainSettings,
    build_optimizer,
    build_scheduler,
    find_resume_dir,
    plan_steps,
    train,
    warmup_cosine,
    warmup_steps,
)
from pipeline.training import checkpoint as ckpt
from pipeline.training.loop import epoch_batches

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def _import_dynamo_once() -> None:
    """The first optimizer in a process imports torch._dynamo (2-6 s); pay it outside the tests."""
    torch.optim.AdamW(nn.Linear(1, 1).parameters())


# ----------------------------------------------------------------------------------------------
# A tiny task: a linear classifier on random data
# ----------------------------------------------------------------------------------------------


class Net(nn.Module):
    """backbone (Linear + LayerNorm) -> dropout -> head; forward takes the batch dict."""

    def __init__(self, dim: int = 8, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, classes)
        self.logit_scale = nn.Parameter(torch.ones(()))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.drop(self.backbone(batch["x"]))) * self.logit_scale  # (B, classes)


class Linear(nn.Module):
    """Purely linear model (deterministic; for the 1-rank vs 2-rank comparison)."""

    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.fc(batch["x"])


class Items(torch.utils.data.Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class ToyTask:
    """Random-teacher classification; validate() also draws random numbers on purpose."""

    selection_metric = "accuracy"

    def __init__(self, n: int = 64, dropout: float = 0.1, linear: bool = False,
                 hidden: int = 8) -> None:
        gen = torch.Generator().manual_seed(123)
        teacher = torch.randn(8, 3, generator=gen)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = (self.x @ teacher).argmax(1)
        self.vx = torch.randn(32, 8, generator=gen)
        self.vy = (self.vx @ teacher).argmax(1)
        torch.manual_seed(7)
        self.model: nn.Module = Linear() if linear else Net(dropout=dropout)
        self.hidden = hidden
        self.validated_steps: list[int] = []

    def train_dataset(self) -> Items:
        return Items(self.x, self.y)

    def collate(self, items: list) -> dict[str, Tensor]:
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss = nn.functional.cross_entropy(model(batch), batch["y"])
        return loss, {"ce": loss.item()}

    def validate(self, model: nn.Module) -> dict[str, float]:
        torch.rand(5), random.random(), np.random.rand()  # must not shift the training stream
        acc = (model({"x": self.vx}).argmax(1) == self.vy).float().mean().item()
        return {"accuracy": acc, "loss": 1.0 - acc}

    def is_backbone(self, name: str) -> bool:
        return name.startswith("backbone.")

    def config_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dims": [8, 3]}


def settings(**kw: Any) -> TrainSettings:
    base = dict(seed=3, batch_size=4, epochs=2, max_steps=0, lr=0.05, weight_decay=0.1,
                warmup_fraction=0.2, grad_clip=1.0, grad_accum=2, ema=0.9, amp=True,
                eval_every=5, checkpoint_every=3, threads=1, coef_lr=0.5)
    return TrainSettings(**{**base, **kw})


def fit(task: ToyTask, s: TrainSettings, out: Path, **kw: Any) -> dict[str, float]:
    """`train` on CPU with a no-op tracker (CPU keeps the comparisons bitwise)."""
    return train(task, s, out, Tracker(), device="cpu", **kw)


def weights(path: Path) -> dict[str, Tensor]:
    return load_file(str(path / "model.safetensors"))


class SimulatedKillError(RuntimeError):
    pass


def crash_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise SimulatedKillError(f"simulated kill at step {s}")
    return hook


# ----------------------------------------------------------------------------------------------
# Settings, optimizer, schedule
# ----------------------------------------------------------------------------------------------


def test_settings_from_stage_configs() -> None:
    c = TrainSettings.from_config(ContrastiveConfig(), seed=1)
    assert (c.seed, c.coef_lr, c.lr, c.weight_decay) == (1, 1e-3, 1e-4, 0.2)
    d = TrainSettings.from_config(DiffusionConfig(batch_size=16), seed=2)
    assert (d.coef_lr, d.batch_size, d.weight_decay, d.cpu_amp) == (1.0, 16, 0.01, False)
    with pytest.raises(PipelineError, match="grad_accum"):
        TrainSettings.from_config(DiffusionConfig(), seed=0, grad_accum=0)


def test_optimizer_groups() -> None:
    model = Net()
    model.backbone[1].weight.requires_grad_(False)  # frozen: left out
    opt = build_optimizer(model, settings(), ToyTask().is_backbone)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone_decay"]["param_names"] == ["backbone.0.weight"]
    assert groups["backbone_no_decay"]["param_names"] == ["backbone.0.bias", "backbone.1.bias"]
    assert groups["head_decay"]["param_names"] == ["head.weight"]
    assert sorted(groups["head_no_decay"]["param_names"]) == ["head.bias", "logit_scale"]
    assert groups["backbone_decay"]["lr"] == pytest.approx(0.025)
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(0.025)
    assert groups["head_decay"]["lr"] == groups["head_no_decay"]["lr"] == 0.05
    assert groups["backbone_decay"]["weight_decay"] == groups["head_decay"]["weight_decay"] == 0.1
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head_no_decay"]["weight_decay"] == 0.0


def test_warmup_cosine_exact_values() -> None:
    assert [warmup_cosine(s, 10, 2) for s in (0, 1, 2, 6, 10, 11)] == [
        0.5, 1.0, 1.0, pytest.approx(0.5), 0.0, 0.0]
    assert warmup_cosine(4, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert warmup_cosine(0, 4, 0) == 1.0
    assert warmup_steps(100, 0.1) == 10 and warmup_steps(30, 0.1) == 3
    assert warmup_steps(100, 0.29) == 29 and warmup_steps(7, 0.0) == 0
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    sched = build_scheduler(opt, total=10, warmup=2)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * warmup_cosine(s, 10, 2) for s in range(10)])


def test_plan_steps_counts_real_optimizer_steps() -> None:
    s = settings(batch_size=5, grad_accum=2, epochs=3)
    # 103 items, 2 ranks: 51 per rank -> 10 micro-batches -> 5 steps per epoch
    assert plan_steps(103, s, world=2) == (5, 15)
    assert plan_steps(103, settings(batch_size=5, grad_accum=3, epochs=3), world=2) == (3, 9)
    assert plan_steps(103, settings(batch_size=5, grad_accum=2, max_steps=7), world=2) == (5, 7)
    with pytest.raises(PipelineError, match="too few"):
        plan_steps(15, s, world=2)


def test_epoch_batches_same_global_batches_for_any_world() -> None:
    one = epoch_batches(40, 8, seed=1, epoch=2)
    two = [epoch_batches(40, 4, seed=1, epoch=2, rank=r, world=2) for r in (0, 1)]
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in zip(*two, strict=True)]
    assert epoch_batches(40, 8, seed=1, epoch=3) != one


# ----------------------------------------------------------------------------------------------
# Checkpoints and EMA
# ----------------------------------------------------------------------------------------------


def _trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = build_optimizer(model, settings(), lambda n: n.startswith("backbone."))
    for _ in range(2):
        model({"x": torch.randn(4, 8)}).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_checkpoint_round_trip_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = _trained_optimizer(model)
    otensors, index = ckpt.optimizer_to_flat(opt)
    rtensors, rdoc = ckpt.rng_state()
    tensors = {**otensors, **{f"rng/{k}": v for k, v in rtensors.items()}}
    ckpt.save(tmp_path / "c", model, {"step": 2, "optimizer": index, "rng": rdoc},
              config={"a": 1}, tensors=tensors)
    expected = (torch.rand(3), random.random(), np.random.rand(2))

    torch.manual_seed(99)
    model2 = Net()
    opt2 = build_optimizer(model2, settings(), lambda n: n.startswith("backbone."))
    c = ckpt.load(tmp_path / "c")
    assert c.state["config"] == {"a": 1} and c.state["step"] == 2
    model2.load_state_dict(c.model)
    ckpt.optimizer_from_flat(opt2, c.tensors, c.state["optimizer"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert pa.keys() == pb.keys()
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert opt2.param_groups[0]["betas"][1] == opt.param_groups[0]["betas"][1]
    ckpt.set_rng_state({k[4:]: v for k, v in c.tensors.items() if k.startswith("rng/")},
                       c.state["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2])
    assert not list(tmp_path.glob(".*"))  # no temp left behind


def test_load_weights_is_strict_and_resume_dir_fallback(tmp_path: Path) -> None:
    ckpt.save(tmp_path / "last", Net(), {"step": 1})
    with pytest.raises(PipelineError, match="do not match"):
        ckpt.load_weights(tmp_path / "last", Linear())
    assert ckpt.load_weights(tmp_path / "last", Net())["step"] == 1
    assert find_resume_dir(tmp_path) == tmp_path / "last"
    (tmp_path / "last").rename(tmp_path / ".last.old")  # killed between atomic_dir's renames
    assert find_resume_dir(tmp_path) == tmp_path / ".last.old"
    with pytest.raises(PipelineError, match="not a checkpoint"):
        ckpt.load(tmp_path / "nothing")


def test_ema_update_math() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.1)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.19)
    with ema.applied(model):
        assert model.weight.item() == pytest.approx(0.19)
    assert model.weight.item() == 1.0
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def test_train_outputs(tmp_path: Path) -> None:
    result = fit(ToyTask(), settings(), tmp_path, log_every=2)
    assert result["steps"] == 16 and result["epochs"] == 2.0  # 64 / 4 / 2 = 8 steps per epoch
    assert result["best_accuracy"] >= result["accuracy"] - 1e-12
    assert {"steps_per_s", "samples_per_s", "elapsed_s", "final_loss", "best_step"} <= set(result)
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr,val/accuracy,val/loss"
    steps = [int(r.split(",")[0]) for r in lines[1:]]
    assert steps == [2, 4, 5, 6, 8, 10, 12, 14, 15, 16]  # every 2 steps and at each eval
    evals = [int(r.split(",")[0]) for r in lines[1:] if not r.endswith(",,")]
    assert evals == [5, 10, 15, 16]
    best = ckpt.load(tmp_path / "best")
    assert best.state["selection_metric"] == "accuracy" and best.state["ema"] is True
    assert best.state["best"] == result["best_accuracy"]
    last = ckpt.load(tmp_path / "last")
    assert last.state["step"] == 16 and last.state["config"] == {"hidden": 8, "dims": [8, 3]}
    assert any(k.startswith("ema/") for k in last.tensors)


def test_resume_after_crash_is_bitwise_identical(tmp_path: Path) -> None:
    ref = fit(ToyTask(), settings(), tmp_path / "a")
    with pytest.raises(SimulatedKillError):  # checkpoint at step 9 (mid epoch 2), crash at 11
        fit(ToyTask(), settings(), tmp_path / "b", on_step=crash_at(11))
    assert ckpt.load(tmp_path / "b" / "last").state["step"] == 9
    got = fit(ToyTask(), settings(), tmp_path / "b")
    for name in ("last", "best"):
        wa, wb = weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ta = ckpt.load(tmp_path / "a" / "last").tensors
    tb = ckpt.load(tmp_path / "b" / "last").tensors
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert got["best_accuracy"] == ref["best_accuracy"] and got["accuracy"] == ref["accuracy"]
    curves_a = (tmp_path / "a" / "curves.csv").read_text().splitlines()
    curves_b = (tmp_path / "b" / "curves.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in curves_a] == [r.split(",")[0] for r in curves_b]


def test_resume_with_changed_setup_is_refused(tmp_path: Path) -> None:
    fit(ToyTask(), settings(max_steps=3), tmp_path)
    with pytest.raises(PipelineError, match=r"lr: 0.05 -> 0.1"):
        fit(ToyTask(), settings(max_steps=3, lr=0.1), tmp_path)
    with pytest.raises(PipelineError, match=r"config.hidden: 8 -> 16"):
        fit(ToyTask(hidden=16), settings(max_steps=3), tmp_path)
    # loader_workers and threads do not change results: allowed
    first = fit(ToyTask(), settings(max_steps=3), tmp_path / "speed")
    done = fit(ToyTask(), settings(max_steps=3, threads=2), tmp_path)
    torch.set_num_threads(1)
    assert done["steps"] == 3
    # a finished run started again trains nothing and reports the speed it measured, not 0
    again = fit(ToyTask(), settings(max_steps=3), tmp_path / "speed")
    assert first["steps_per_s"] > 0 and again["steps_per_s"] == first["steps_per_s"]
    assert again["samples_per_s"] == first["samples_per_s"]


def test_validation_does_not_shift_training(tmp_path: Path) -> None:
    fit(ToyTask(), settings(eval_every=5), tmp_path / "a")
    fit(ToyTask(), settings(eval_every=0), tmp_path / "b")  # validate() draws random numbers
    wa, wb = weights(tmp_path / "a" / "last"), weights(tmp_path / "b" / "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cpu_amp_and_loader_workers_run(tmp_path: Path) -> None:
    out = fit(ToyTask(), settings(max_steps=2, cpu_amp=True, loader_workers=1), tmp_path)
    assert out["steps"] == 2 and math.isfinite(out["final_loss"])


# ----------------------------------------------------------------------------------------------
# Slow: a real SIGKILL during a checkpoint save; a 2-rank gloo run
# ----------------------------------------------------------------------------------------------

CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from safetensors import torch as st
import test_training as T
from pipeline.training import checkpoint

real = st.save_file
def hanging_save(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if "/.last." in path and path.endswith("model.safetensors"):
        n = int(os.environ["SAVES_BEFORE_HANG"]) - 1
        os.environ["SAVES_BEFORE_HANG"] = str(n)
        if n == 0:
            open({marker!r}, "w").close()
            time.sleep(120)
checkpoint.save_file = hanging_save
T.fit(T.ToyTask(), T.settings(), {out!r})
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_resumes_exactly(tmp_path: Path) -> None:
    marker = tmp_path / "in-save"
    out = tmp_path / "b"
    code = CHILD.format(tests=str(TESTS), marker=str(marker), out=str(out))
    env = {**os.environ, "SAVES_BEFORE_HANG": "3", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=TESTS.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_at_marker(proc, marker, 120, "the third save")
    assert ckpt.load(out / "last").state["step"] == 6  # saves at 3, 6; killed inside 9
    assert list(out.glob(".last.*.tmp"))  # the half-written checkpoint
    fit(ToyTask(), settings(), out)
    assert not list(out.glob(".*.tmp"))
    fit(ToyTask(), settings(), tmp_path / "a")
    wa, wb = weights(tmp_path / "a" / "last"), weights(out / "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pipeline import dist

    torch.distributed.init_process_group("gloo")  # gloo even where CUDA is present
    try:
        result = fit(ToyTask(linear=True), _ddp_settings(batch_size=4), Path(out),
                     env=DistEnv(rank, rank, world))
        assert result["steps"] == 8
    finally:
        dist.shutdown()


def _ddp_settings(batch_size: int) -> TrainSettings:
    return settings(batch_size=batch_size, grad_accum=1, ema=0.0, eval_every=0,
                    checkpoint_every=0, epochs=1, lr=0.1)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_full_batch(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "ddp")),
                                nprocs=2, join=True)
    task = ToyTask(linear=True)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit(task, _ddp_settings(batch_size=8), tmp_path / "one")
    w2, w1 = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "one" / "last")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
        assert not torch.allclose(w1[k], before[k], atol=1e-3), k  # it learned something
    curves = (tmp_path / "ddp" / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,epoch,loss,lr,val/accuracy")
