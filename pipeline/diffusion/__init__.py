"""DiffusionRet stage 2: the noise schedule and sampler, seeded noise, candidate mining, loss and
re-ranking. The denoiser network lives in `pipeline.models.denoiser`."""
from pipeline.diffusion.loss import positive_cross_entropy
from pipeline.diffusion.mining import Mined, hardest, mine_batch, one_hot_target
from pipeline.diffusion.noise import query_keys, seeded_normal
from pipeline.diffusion.rerank import RerankSettings, generate_scores, rerank, sample_top_k
from pipeline.diffusion.schedule import GaussianDiffusion, respaced_timesteps

__all__ = [
    "GaussianDiffusion",
    "Mined",
    "RerankSettings",
    "generate_scores",
    "hardest",
    "mine_batch",
    "one_hot_target",
    "positive_cross_entropy",
    "query_keys",
    "rerank",
    "respaced_timesteps",
    "sample_top_k",
    "seeded_normal",
]
