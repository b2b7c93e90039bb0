"""v3kit: a research kit for the SFT -> RCE -> GRPO ("v3") pipeline of an embedding-based ranker."""

from .config import RunConfig, load_config
from .data.contract import GroupData, Splits, split_by_query
from .data.synthetic import SyntheticConfig, make_world
from .data.tables import load_groups
from .pipeline import prepare_data, run_pipeline
from .run import Run
from .train.grpo import GRPOConfig, GRPOStage, run_grpo
from .train.import_sft import import_sft
from .train.losses import group_advantages, group_log_probs, grpo_loss, rce_loss
from .train.metrics import evaluate, ranking_metrics
from .train.model import ModelConfig, TwoTower, build_model
from .train.rce import RCEConfig, RCEStage, run_rce
from .train.sft import SFTConfig, SFTStage, Stage1, load_sft, train_sft
from .train.training import Callback, OptimConfig, RunContext, Stage, StageResult, fit

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "GRPOConfig",
    "GRPOStage",
    "GroupData",
    "ModelConfig",
    "OptimConfig",
    "RCEConfig",
    "RCEStage",
    "Run",
    "RunConfig",
    "RunContext",
    "SFTConfig",
    "SFTStage",
    "Splits",
    "Stage",
    "Stage1",
    "StageResult",
    "SyntheticConfig",
    "TwoTower",
    "build_model",
    "evaluate",
    "fit",
    "group_advantages",
    "group_log_probs",
    "grpo_loss",
    "import_sft",
    "load_config",
    "load_groups",
    "load_sft",
    "make_world",
    "prepare_data",
    "ranking_metrics",
    "rce_loss",
    "run_grpo",
    "run_pipeline",
    "run_rce",
    "split_by_query",
    "train_sft",
]
