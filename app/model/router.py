"""The router: backbone → pooled vector → MLP → shared representation → K binary heads."""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
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


class PreparedBatch(tuple[Post, ...]):
    """Posts with their inputs built already (`Router.prepare`), so that building them (the
    CPU work: tokenising, image resize and patchify) can run on another thread while the
    device runs the batch before. `predict_proba` takes it like any sequence of posts and
    skips the build."""

    inputs: dict[str, torch.Tensor]
    lexical_logits: np.ndarray | None  # the lexical head's n-gram logits, when it has one

    def __new__(
        cls,
        posts: Iterable[Post],
        inputs: dict[str, torch.Tensor],
        lexical_logits: np.ndarray | None = None,
    ) -> "PreparedBatch":
        batch = super().__new__(cls, posts)
        batch.inputs = inputs
        batch.lexical_logits = lexical_logits
        return batch


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

    def fit_image(self, image: Image.Image) -> Image.Image:
        """A decoded image reduced to what `build_inputs` reads of it (`Backbone.fit_image`)."""
        return self.base_backbone.fit_image(image)

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """CPU tensors for `posts` (the backbone's input builder, shared with training)."""
        return self.base_backbone.build_inputs(posts)

    def prepare(self, posts: Sequence[Post]) -> PreparedBatch:
        """`build_inputs` ahead of the forward, safe on a thread other than the model's while
        the model runs (it reads no state the forward writes), but one call at a time: a fast
        tokenizer sets its padding on the shared instance ("Already borrowed" when two
        threads do it at once). On CUDA the tensors are put
        in page-locked memory, so the forward's copy to the device (`non_blocking`, in
        `Backbone.prepare_for_device`) is asynchronous; on the CPU they are left as built,
        so the scores are exactly those of `predict_proba(posts)`."""
        inputs = self.build_inputs(posts)
        if self.device.type == "cuda":
            inputs = {name: tensor.pin_memory() for name, tensor in inputs.items()}
        # The lexical head's n-grams are text preprocessing too (~2 ms a post on 2 CPUs).
        lexical = None
        if self.lexical is not None:
            lexical = self.lexical.logits([post.text() for post in posts])
        return PreparedBatch(posts, inputs, lexical)

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
        With a lexical head, the logits are blended with its n-gram logits first. A
        `PreparedBatch` brings its inputs: only the forward (and the blend) runs here.
        """
        was_training = self.training
        self.eval()
        try:
            prepared = posts if isinstance(posts, PreparedBatch) else None
            logits = self.forward(self.build_inputs(posts) if prepared is None else prepared.inputs)
            if self.lexical is None:
                return torch.sigmoid(logits).cpu()
            texts = [post.text() for post in posts]
            lexical = None if prepared is None else prepared.lexical_logits
            blended = self.lexical.blend(texts, logits.double().cpu().numpy(), lexical)
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
