"""The one training loop both DiffusionRet stages run (stage 1 contrastive, stage 2 diffusion).

A stage describes *what* to train with a `Task`; `train` owns *how*: optimizer groups, warmup +
cosine schedule, gradient accumulation and clipping, AMP, EMA, DDP, deterministic data order,
validation / best-checkpoint selection, atomic checkpoints with exact resume, and logging.
"""
from pipeline.training.checkpoint import Checkpoint, find_resume_dir, load, load_weights, save
from pipeline.training.ema import EMA
from pipeline.training.loop import Task, TrainSettings, plan_steps, seed_everything, train
from pipeline.training.lr import build_scheduler, warmup_cosine, warmup_steps
from pipeline.training.optim import build_optimizer, param_groups

__all__ = [
    "EMA",
    "Checkpoint",
    "Task",
    "TrainSettings",
    "build_optimizer",
    "build_scheduler",
    "find_resume_dir",
    "load",
    "load_weights",
    "param_groups",
    "plan_steps",
    "save",
    "seed_everything",
    "train",
    "warmup_cosine",
    "warmup_steps",
]
