"""Every knob of a training run, validated; saved beside each checkpoint and the final router."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The averages of `EvaluationReport.to_dict()` a run can select its checkpoint by; all are
# "higher is better" (PR-AUC, recall at precision 0.6, auto-pass rate at recall 0.90 / 0.95).
SelectMetric = Literal["pr_auc", "r_at_p60", "apr_r90", "apr_r95"]


class TrainConfig(BaseModel):
    """One training run (`radar train` / `radar train-expert`); defaults follow the paper."""

    # `model_*` field names are ours here, not pydantic's.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    data: Path = Field(description="training JSONL (DESIGN.md's format)")
    val: Path | None = Field(default=None, description="validation JSONL")
    model_config_path: Path = Field(description="router.json to start from (fresh LoRA + heads)")
    out: Path = Field(description="model-store directory to write")
    categories: tuple[str, ...] | None = Field(
        default=None, description="override the config's categories (an expert has one)"
    )
    model_version: str | None = Field(default=None, description="default: from the out dir")

    lam: float = Field(default=0.5, ge=0.0, le=1.0, description="distillation weight λ")
    use_mask: bool = Field(default=True, description="False: the 'BCE w/o mask' baseline")
    lr: float = Field(default=1e-5, gt=0.0, description="AdamW learning rate (backbone, LoRA)")
    head_lr: float | None = Field(default=None, gt=0.0, description="MLP + heads; default lr")
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.2, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=32, ge=1, description="per process, per micro-step")
    grad_accum: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; caps epochs")
    seed: int = 0
    gradient_checkpointing: bool = False
    full_finetune: bool = Field(
        default=False,
        description="train every backbone weight at --lr instead of LoRA (a frozen image "
        "tower stays frozen); the store then holds the backbone's weights",
    )
    length_buckets: bool = Field(
        default=True,
        description="batch posts of similar text length together (less padding), "
        "batches in random order",
    )

    log_every: int = Field(default=10, ge=1, description="optimizer steps between log lines")
    eval_every: int | None = Field(
        default=None,
        ge=1,
        description="optimizer steps between validations (besides each epoch's end)",
    )
    select_metric: SelectMetric = Field(
        default="pr_auc",
        description="validation average that picks the saved weights (the best validation "
        "wins, not the last step)",
    )
    early_stop_patience: int | None = Field(
        default=None, ge=1, description="stop after this many epochs without a better validation"
    )
    checkpoint_every: int | None = Field(default=None, ge=1, description="optimizer steps")
    resume: Path | None = Field(default=None, description="a checkpoint directory to continue")
    feature_cache: Path | None = Field(
        default=None,
        description="directory caching frozen image-encoder features across epochs and runs "
        "(dual encoder; shared by experts, teach, evaluate)",
    )
    skip_bad: bool = Field(default=False, description="skip and count bad data lines")
    record_seen: bool = Field(default=False, description="write the post ids each rank saw")
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.categories is not None and len(set(self.categories)) != len(self.categories):
            raise ValueError("categories repeat")
        if self.early_stop_patience is not None and self.val is None:
            raise ValueError("early_stop_patience needs a validation set (val)")
        return self
