"""`train(task, settings, out_dir, tracker)`: the loop both stages share.

Determinism: the data order of epoch e is a pure function of (seed, epoch, rank, world); a resumed
run restores weights, optimizer, scheduler, EMA and every rank's RNG state, and skips the batches
of the current epoch it already consumed, so on CPU it ends bitwise equal to an uninterrupted run.
Validation runs with the RNG state saved and restored, so it never shifts the training stream.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import dist
from pipeline.config import flatten
from pipeline.dist import DistEnv
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, remove_stale_temps
from pipeline.log import get_logger
from pipeline.tracking import Tracker
from pipeline.training import checkpoint as ckpt
from pipeline.training.ema import EMA
from pipeline.training.lr import build_scheduler, warmup_cosine, warmup_steps
from pipeline.training.optim import build_optimizer

log = get_logger(__name__)

# Settings that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = ("loader_workers", "threads")


@dataclass(frozen=True)
class TrainSettings:
    """The training options both stages share (a stage config minus its model options)."""

    seed: int
    batch_size: int  # per rank, per micro-batch
    epochs: int
    max_steps: int  # > 0 overrides epochs (optimizer steps)
    lr: float
    weight_decay: float
    warmup_fraction: float
    grad_clip: float  # <= 0: off
    grad_accum: int
    ema: float  # 0 = off, else the decay
    amp: bool  # bf16 autocast on CUDA when supported
    eval_every: int  # optimizer steps; 0 = at the end of each epoch
    checkpoint_every: int  # optimizer steps; <= 0: only at the end
    loader_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    coef_lr: float = 1.0  # backbone lr = lr * coef_lr
    cpu_amp: bool = False  # also autocast on CPU (bf16) when amp; off keeps CPU bitwise exact

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps > 0 or self.epochs >= 1, "need epochs >= 1 or max_steps > 0"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.warmup_fraction < 1.0, "warmup_fraction must be in [0, 1)"),
            (0.0 <= self.ema < 1.0, "ema must be 0 (off) or a decay in (0, 1)"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.loader_workers >= 0, "loader_workers must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PipelineError(f"training settings: {msg}")

    @classmethod
    def from_config(cls, cfg: Any, seed: int, **overrides: Any) -> TrainSettings:
        """The shared fields of a ContrastiveConfig / DiffusionConfig (coef_lr 1.0 if absent)."""
        values = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cls)
            if f.name != "seed" and hasattr(cfg, f.name)
        }
        return cls(seed=seed, **{**values, **overrides})


class Task(Protocol):
    """What a stage hands to `train`: a model, its data and its loss."""

    model: nn.Module  # trainable parameters: those with requires_grad
    selection_metric: str  # key of `validate`'s dict; higher is better

    def train_dataset(self) -> Dataset:
        """The training set (indexable, with len)."""

    def collate(self, items: list) -> Any:
        """Dataset items -> one batch (tensors on CPU; the loop moves tensors to the device)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise and named floats to log; call `model(...)` (may be DDP)."""

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (rank 0, unwrapped model, EMA weights when on, no_grad, eval mode)."""

    def is_backbone(self, param_name: str) -> bool:
        """Whether a parameter trains at lr * coef_lr."""

    def config_dict(self) -> dict[str, Any]:
        """The model's config, saved with checkpoints and compared on resume."""


# ----------------------------------------------------------------------------------------------
# Determinism helpers
# ----------------------------------------------------------------------------------------------


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from (seed, parts...), stable across processes and Python versions."""
    blob = json.dumps([seed, *[str(p) for p in parts]]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_steps(n_items: int, settings: TrainSettings, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps), counting only steps the loop takes.

    Each rank sees n_items // world items per epoch in batch_size micro-batches (drop_last), and
    every grad_accum micro-batches make one step (a trailing incomplete group is dropped, so
    every step averages the same number of samples). max_steps > 0 overrides epochs.
    """
    micro = (n_items // world) // settings.batch_size
    per_epoch = micro // settings.grad_accum
    if per_epoch == 0:
        raise PipelineError(
            f"{n_items} training items are too few for one optimizer step (batch_size "
            f"{settings.batch_size} x grad_accum {settings.grad_accum} x {world} rank(s))"
        )
    total = settings.max_steps if settings.max_steps > 0 else per_epoch * settings.epochs
    return per_epoch, total


def epoch_batches(
    n_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
) -> list[list[int]]:
    """This rank's micro-batches (dataset indices) for one epoch; drop_last at both levels.

    One permutation per (seed, epoch) is dealt round robin to the ranks (DistributedSampler
    style), so global batch k is the same set of items for any world size with the same
    batch_size * world.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    perm = torch.randperm(n_items, generator=gen).tolist()
    per_rank = n_items // world
    mine = perm[rank : per_rank * world : world]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(per_rank // batch_size)]


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block (validation) without moving any global RNG stream."""
    tensors, doc = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(tensors, doc)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists, tuples, namedtuples and dataclasses, moved to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to(getattr(batch, f.name), device)
                   for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


def autocast(device: torch.device, settings: TrainSettings) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when supported) or on CPU only with cpu_amp; else a no-op."""
    if settings.amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if settings.amp and settings.cpu_amp and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    task: Task,
    settings: TrainSettings,
    out_dir: str | Path,
    tracker: Tracker,
    env: DistEnv | None = None,
    log_every: int = 10,
    on_step: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train `task.model` to `settings`, resuming from `out_dir/last` when it exists.

    Writes (rank 0 only) `out_dir/last/` every checkpoint_every steps and at the end,
    `out_dir/best/` whenever the selection metric improves, and `out_dir/curves.csv`.
    `on_step(step)` runs on every rank after each optimizer step (and its checkpoint); tests use
    it to simulate a crash. `device` defaults to `pipeline.dist.device(env)` (CUDA when present);
    with an already initialised process group (e.g. gloo in tests) `train` does not init one.
    Returns, on every rank: steps, epochs, best_<metric>, best_step,
    last validation metrics, final_loss, steps_per_s, samples_per_s, elapsed_s.
    """
    env = dist.init(env or dist.env())
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    dev = torch.device(device) if device is not None else dist.device(env)
    run = _Run(task, settings, Path(out_dir), tracker, env, max(1, log_every), dev)
    return run.fit(on_step)


class _Run:
    """State of one `train` call; split into small verbs so the loop reads top to bottom."""

    def __init__(
        self, task: Task, settings: TrainSettings, out: Path, tracker: Tracker, env: DistEnv,
        log_every: int, device: torch.device,
    ) -> None:
        self.task, self.s, self.out, self.tracker, self.env = task, settings, out, tracker, env
        self.log_every = log_every
        self.device = device
        self.dataset = task.train_dataset()
        self.n_items = len(self.dataset)  # type: ignore[arg-type]
        self.per_epoch, self.total = plan_steps(self.n_items, settings, env.world_size)
        self.warmup = warmup_steps(self.total, settings.warmup_fraction)
        self.model = task.model.to(self.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, settings, task.is_backbone)
        self.scheduler = build_scheduler(self.optimizer, self.total, self.warmup)
        self.ema = EMA(self.model, settings.ema) if settings.ema > 0 else None
        self.config = json.loads(json.dumps(task.config_dict()))
        self.step = 0
        self.best: float | None = None
        self.best_step = -1
        self.train_seconds = 0.0  # training wall time over every session of this run
        self._t_mark = time.perf_counter()
        self.last_metrics: dict[str, float] = {}
        self.curves: dict[int, dict[str, float]] = {}
        self.window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window_micro = 0
        self.window_parts: dict[str, float] = {}
        self.final_loss = math.nan
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
        self._resume_or_seed()
        self.wrapped: nn.Module = self.model
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)

    # -- resume ---------------------------------------------------------------------------------

    def _resume_or_seed(self) -> None:
        found = ckpt.find_resume_dir(self.out)
        if found is None:
            seed_everything(derive_seed(self.s.seed, "rank", self.env.rank))
            return
        c = ckpt.load(found)
        st = c.state
        self._check_compatible(found, st)
        missing = self.model.load_state_dict(c.model, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise PipelineError(f"{found}: weights do not match the model ({missing})")
        ckpt.optimizer_from_flat(self.optimizer, c.tensors, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(
                {k[4:]: v for k, v in c.tensors.items() if k.startswith("ema/")})
        prefix = f"rng/{self.env.rank}/"
        ckpt.set_rng_state(
            {k[len(prefix):]: v for k, v in c.tensors.items() if k.startswith(prefix)},
            st["rng"][self.env.rank],
        )
        self.step = int(st["step"])
        self.best, self.best_step = st["best"], int(st["best_step"])
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.last_metrics = st.get("metrics", {})
        self.curves = {r["step"]: r for r in _read_curves(self.out / "curves.csv")
                       if r["step"] <= self.step}
        log.info("resumed from %s at step %d/%d", found, self.step, self.total)

    def _check_compatible(self, found: Path, st: dict[str, Any]) -> None:
        changes = []
        now = dataclasses.asdict(self.s)
        for key in sorted(set(now) | set(st["settings"])):
            if key not in RESUME_FREE and st["settings"].get(key) != now.get(key):
                changes.append(f"{key}: {st['settings'].get(key)!r} -> {now.get(key)!r}")
        old_cfg, new_cfg = flatten(st.get("config", {})), flatten(self.config)
        for key in sorted(set(old_cfg) | set(new_cfg)):
            if old_cfg.get(key) != new_cfg.get(key):
                changes.append(f"config.{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
        for key, now_v in (("world_size", self.env.world_size), ("n_items", self.n_items)):
            if st.get(key) != now_v:
                changes.append(f"{key}: {st.get(key)!r} -> {now_v!r}")
        if changes:
            raise PipelineError(
                f"cannot resume from {found}: it was trained with a different setup ("
                + "; ".join(changes) + f"); delete {self.out} to start over or restore the values"
            )

    # -- main loop ------------------------------------------------------------------------------

    def fit(self, on_step: Callable[[int], None] | None) -> dict[str, float]:
        t0 = time.perf_counter()
        self._t_mark = t0
        self.t_window, self.step_window = t0, self.step
        bar = tqdm(total=self.total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self.env.is_main)
        saved_at = self.step if self.step > 0 else -1
        while self.step < self.total:
            for batch_ready in self._epoch_batches():
                if not batch_ready:
                    continue
                bar.update(1)
                self._after_step(bar)
                if self.s.checkpoint_every > 0 and self.step % self.s.checkpoint_every == 0:
                    self._save_last()
                    saved_at = self.step
                if on_step is not None:
                    on_step(self.step)
                if self.step >= self.total:
                    break
        bar.close()
        if saved_at != self.step:
            self._save_last()
        elapsed = time.perf_counter() - t0
        return self._summary(elapsed)

    def _epoch_batches(self) -> Iterator[bool]:
        """Run the micro-batches of the current epoch; yield True after each optimizer step."""
        epoch = self.step // self.per_epoch
        skip = (self.step - epoch * self.per_epoch) * self.s.grad_accum
        plan = epoch_batches(self.n_items, self.s.batch_size, self.s.seed, epoch,
                             self.env.rank, self.env.world_size)
        plan = plan[: self.per_epoch * self.s.grad_accum][skip:]
        loader = DataLoader(
            self.dataset, batch_sampler=plan, collate_fn=self.task.collate,
            num_workers=self.s.loader_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(
                derive_seed(self.s.seed, "workers", epoch, self.env.rank)),
        )
        for i, batch in enumerate(loader):
            yield self._micro_step(batch, last=(i + skip + 1) % self.s.grad_accum == 0)

    def _micro_step(self, batch: Any, last: bool) -> bool:
        batch = move_to(batch, self.device)
        sync = contextlib.nullcontext()
        if self.env.distributed and not last:
            sync = self.wrapped.no_sync()  # type: ignore[operator]
        with sync:
            with autocast(self.device, self.s):
                loss, parts = self.task.loss(self.wrapped, batch)
            (loss / self.s.grad_accum).backward()
        self.window_loss += loss.detach().double()
        self.window_micro += 1
        for k, v in parts.items():
            self.window_parts[k] = self.window_parts.get(k, 0.0) + float(v)
        if not last:
            return False
        if self.s.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return True

    def _after_step(self, bar: tqdm) -> None:
        is_eval = self.step == self.total or (
            self.step % self.s.eval_every == 0 if self.s.eval_every > 0
            else self.step % self.per_epoch == 0
        )
        if is_eval or self.step % self.log_every == 0:
            self._log_train(bar)
        if is_eval:
            self._evaluate()

    def _log_train(self, bar: tqdm) -> None:
        stats = torch.stack([self.window_loss, torch.tensor(
            float(self.window_micro), dtype=torch.float64, device=self.device)])
        if self.env.distributed:
            torch_dist.all_reduce(stats)
        loss = (stats[0] / stats[1].clamp_min(1)).item()
        parts = {f"train/{k}": v / max(1, self.window_micro) for k, v in self.window_parts.items()}
        self.window_loss.zero_()
        self.window_micro = 0
        self.window_parts = {}
        now = time.perf_counter()
        steps_per_s = (self.step - self.step_window) / max(now - self.t_window, 1e-9)
        self.t_window, self.step_window = now, self.step
        self.final_loss = loss
        if not self.env.is_main:
            return
        lr = self.s.lr * warmup_cosine(self.step - 1, self.total, self.warmup)
        row = self.curves.setdefault(self.step, {})
        row.update(step=self.step, epoch=self.step / self.per_epoch, loss=loss, lr=lr)
        self.tracker.log_metrics({
            "train/loss": loss, "train/lr": lr, "train/steps_per_s": steps_per_s,
            "train/samples_per_s": steps_per_s * self._samples_per_step(), **parts,
        }, step=self.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def _evaluate(self) -> None:
        if self.env.is_main:
            with rng_preserved(), torch.no_grad(), self._eval_weights():
                metrics = {k: float(v) for k, v in self.task.validate(self.model).items()}
                name = self.task.selection_metric
                if name not in metrics:
                    raise PipelineError(
                        f"validate() returned no '{name}' (got {sorted(metrics)})")
                value = metrics[name]
                if math.isfinite(value) and (self.best is None or value > self.best):
                    self.best, self.best_step = value, self.step
                    self._save_best(metrics)
            self.last_metrics = metrics
            self.curves[self.step].update({f"val/{k}": v for k, v in metrics.items()})
            self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
            _write_curves(self.out / "curves.csv", self.curves)
            log.info("step %d: %s = %.4f (best %.4f at step %d)", self.step, name, value,
                     self.best if self.best is not None else math.nan, self.best_step)
        dist.barrier()

    @contextlib.contextmanager
    def _eval_weights(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema.applied(self.model) if self.ema else contextlib.nullcontext():
                yield
        finally:
            self.model.train(was_training)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_best(self, metrics: dict[str, float]) -> None:
        ckpt.save(self.out / "best", self.model, {
            "kind": "best", "step": self.step, "epoch": self.step / self.per_epoch,
            "metrics": metrics, "selection_metric": self.task.selection_metric,
            "best": self.best, "ema": self.ema is not None,
        }, config=self.config)

    def _save_last(self) -> None:
        rng_tensors, rng_doc = ckpt.rng_state()
        gathered: list[Any] = [(rng_tensors, rng_doc)]
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            torch_dist.all_gather_object(gathered, (rng_tensors, rng_doc))
        now = time.perf_counter()
        self.train_seconds += now - self._t_mark
        self._t_mark = now
        if not self.env.is_main:
            return
        tensors, index = ckpt.optimizer_to_flat(self.optimizer)
        for rank, (t, _) in enumerate(gathered):
            tensors.update({f"rng/{rank}/{k}": v for k, v in t.items()})
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        state = {
            "kind": "last", "step": self.step, "epoch": self.step / self.per_epoch,
            "total_steps": self.total, "settings": dataclasses.asdict(self.s),
            "world_size": self.env.world_size, "n_items": self.n_items,
            "optimizer": index, "scheduler": self.scheduler.state_dict(),
            "rng": [doc for _, doc in gathered], "best": self.best, "best_step": self.best_step,
            "selection_metric": self.task.selection_metric, "metrics": self.last_metrics,
            "train_seconds": self.train_seconds,
        }
        ckpt.save(self.out / "last", self.model, state, config=self.config, tensors=tensors)
        _write_curves(self.out / "curves.csv", self.curves)

    # -- summary --------------------------------------------------------------------------------

    def _samples_per_step(self) -> int:
        return self.s.batch_size * self.s.grad_accum * self.env.world_size

    def _summary(self, elapsed: float) -> dict[str, float]:
        """Speed over the whole run (resumed sessions summed, so a finished run started again
        reports what it measured), elapsed_s of this session."""
        result: dict[str, Any] = {}
        secs = self.train_seconds
        if self.env.is_main:
            name = self.task.selection_metric
            result = {
                **self.last_metrics,
                f"best_{name}": self.best if self.best is not None else math.nan,
                "best_step": self.best_step, "steps": self.step,
                "epochs": self.step / self.per_epoch, "final_loss": self.final_loss,
                "steps_per_s": self.step / secs if secs > 0 else 0.0,
                "samples_per_s": self.step * self._samples_per_step() / secs if secs > 0 else 0.0,
                "elapsed_s": elapsed,
            }
        if self.env.distributed:
            box = [result]
            torch_dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result


def _write_curves(path: Path, rows: dict[int, dict[str, float]]) -> None:
    """Rewrite curves.csv whole: step, epoch, loss, lr, then validation columns."""
    base = ["step", "epoch", "loss", "lr"]
    extra = sorted({k for r in rows.values() for k in r} - set(base))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=base + extra, restval="")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow(rows[step])


def _read_curves(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
    for r in rows:
        r["step"] = int(r["step"])
    return rows


def publish_metrics(out: Path, metrics: dict[str, Any], tracker: Tracker, env: DistEnv) -> None:
    """Rank 0: write out/metrics.json and log it (best/* = the chosen checkpoint's val metrics)."""
    if not env.is_main:
        return
    from pipeline import io

    io.write_json(out / "metrics.json", metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if k != "val"})
    tracker.log_metrics({f"best/{k}": v for k, v in metrics["val"].items()})
    tracker.log_artifact(out / "metrics.json")
    tracker.log_artifact(out / "curves.csv")
