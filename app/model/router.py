"""The router: backbone → pooled vector → MLP → shared representation → K binary heads."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from app.model.backbones import Backbone
from app.model.config import HeadConfig, LoraSettings, RouterConfig
from app.model.lexical import LexicalHead
from app.model.post import Post


def build_mlp(in_dim: int, config: HeadConfig) -> tuple[nn.Sequential, int]:
    """The MLP from the pooled vector to the shared representation, and its output width."""
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in config.hidden_dims:
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
        width = hidden
    return nn.Sequential(*layers), width


def wrap_with_lora(backbone: Backbone, settings: LoraSettings) -> PeftModel:
    """Put fresh LoRA adapters on the backbone; extras stay trainable, base weights frozen."""
    targets = settings.target_modules or backbone.default_lora_targets
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
    )
    wrapped = get_peft_model(backbone, lora)
    for param in backbone.extras.values():
        param.requires_grad_(True)
    return wrapped


class Router(nn.Module):
    """`R_θ: X → [0,1]^K`, one probability per named category."""

    def __init__(self, config: RouterConfig, backbone: Backbone | PeftModel) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.mlp, shared_dim = build_mlp(self.base_backbone.hidden_size, config.head)
        # One independent binary head per category (named, so the saved keys say which).
        self.heads = nn.ModuleDict({name: nn.Linear(shared_dim, 1) for name in config.categories})
        # The n-gram model blended into `predict_proba` (router.json `lexical_head`), fitted
        # after training; `forward`, what training differentiates, never sees it.
        self.lexical: LexicalHead | None = None

    @property
    def base_backbone(self) -> Backbone:
        """The backbone itself, under its LoRA wrapper if it has one."""
        if isinstance(self.backbone, PeftModel):
            base = self.backbone.get_base_model()
            if not isinstance(base, Backbone):
                raise TypeError(f"LoRA wraps a {type(base).__name__}, not a Backbone")
            return base
        return self.backbone

    @property
    def categories(self) -> tuple[str, ...]:
        return self.config.categories

    @property
    def device(self) -> torch.device:
        return next(self.mlp.parameters(), next(self.heads.parameters())).device

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """CPU tensors for `posts` (the backbone's input builder, shared with training)."""
        return self.base_backbone.build_inputs(posts)

    def use_feature_cache(self, directory: Path | str | None) -> bool:
        """Cache the backbone's frozen features (the dual encoder's image features) on disk.

        For offline runs over a data set that see each image many times (training epochs,
        experts, `teach`, `evaluate`, `calibrate`): call it once after loading, before
        `build_inputs`; None turns it off. A no-op returning False for backbones with nothing
        to cache. Never for serving: uploads are hostile and the cache is unbounded.
        """
        return self.base_backbone.use_feature_cache(directory)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits `[batch, K]` in category order; the heads run in float32."""
        pooled = self.backbone(self.base_backbone.prepare_for_device(inputs))
        shared = self.mlp(pooled.float())
        return torch.cat([self.heads[name](shared) for name in self.categories], dim=1)

    @torch.inference_mode()
    def predict_proba(self, posts: Sequence[Post]) -> torch.Tensor:
        """`p_k = sigmoid(logit_k)`, `[batch, K]` on the CPU; for serving and evaluation.

        Always in eval mode (no dropout), whatever mode the router is in; the mode is restored.
        With a lexical head, the logits are blended with its n-gram logits first.
        """
        was_training = self.training
        self.eval()
        try:
            logits = self.forward(self.build_inputs(posts))
            if self.lexical is None:
                return torch.sigmoid(logits).cpu()
            texts = [post.text() for post in posts]
            blended = self.lexical.blend(texts, logits.double().cpu().numpy())
            return torch.sigmoid(torch.from_numpy(blended)).float()
        finally:
            self.train(was_training)

    def place(self, device: torch.device | str) -> "Router":
        """Move to `device`: a CUDA backbone runs in bf16, the CPU in float32; heads in fp32."""
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.backbone.to(device=device, dtype=dtype)
        self.mlp.to(device=device, dtype=torch.float32)
        self.heads.to(device=device, dtype=torch.float32)
        return self
