"""Text-encoder backbone (BERT-like, e.g. all-MiniLM-L6-v2) and the text half it shares.

`TextEncoder` (tokenizer + Hugging Face encoder + pooling) is the one piece of text code:
`TextEncoderBackbone` is just it, and `DualEncoderBackbone` puts an image encoder beside it.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.model.backbones.base import Backbone
from app.model.config import BackboneConfig, Pooling, resolve_path
from app.model.errors import InputError, ModelStoreError
from app.model.files import is_dir, is_file
from app.model.post import Post

# What a failed `from_pretrained` raises in practice: unreadable or malformed files.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# BERT-like attention projections. All-MiniLM-L6-v2 names them
# `encoder.layer.<i>.attention.self.{query,key,value}`; EfficientNet has no such names.
BERT_LORA_TARGETS = ("query", "value")


def pool_hidden(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling
) -> torch.Tensor:
    """One vector per sequence from `[batch, seq, dim]` hidden states of a right-padded batch."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        # Right padding (forced at load time): the last real token sits at length - 1.
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if is_file(directory / n)), None)


def load_pretrained_encoder(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`AutoModel` + `AutoTokenizer` from a local directory, offline, in float32.

    Every failure is a `ModelStoreError` naming the file at fault, and weights missing from the
    checkpoint are an error too (transformers would otherwise initialise them at random).
    """
    if not is_dir(directory):
        raise ModelStoreError(directory, "text-encoder directory does not exist")
    config_file = directory / "config.json"
    if not is_file(config_file):
        raise ModelStoreError(config_file, "missing (text-encoder config)")
    weights = _first_existing(directory, WEIGHT_FILES)
    if weights is None:
        raise ModelStoreError(directory / WEIGHT_FILES[0], "missing (text-encoder weights)")
    tokenizer_file = _first_existing(directory, TOKENIZER_FILES)
    if tokenizer_file is None:
        raise ModelStoreError(directory / TOKENIZER_FILES[0], "missing (text-encoder tokenizer)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise ModelStoreError(config_file, f"cannot read the encoder config: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise ModelStoreError(tokenizer_file, f"cannot load the tokenizer: {exc}") from None
    try:
        model, info = AutoModel.from_pretrained(
            directory,
            config=config,
            local_files_only=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except LOAD_ERRORS as exc:
        raise ModelStoreError(weights, f"cannot load the encoder weights: {exc}") from None
    # The BERT pooler is never used (we pool hidden states), and some checkpoints omit it.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing:
        raise ModelStoreError(weights, f"weights missing from the checkpoint: {missing[:8]}")
    return model, tokenizer


class TextEncoder(nn.Module):
    """A Hugging Face encoder and its tokenizer, pooled to one vector per text."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: Pooling,
        max_tokens: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # Pooling by position (cls, last_token) assumes real tokens come first.
        self.tokenizer.padding_side = "right"
        self.pooling: Pooling = pooling
        # Never past the position table: a longer text would index out of it.
        limit = getattr(model.config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, limit)

    @classmethod
    def load(cls, directory: Path, pooling: Pooling, max_tokens: int) -> Self:
        """Load from a `from_pretrained` directory (see `load_pretrained_encoder`)."""
        model, tokenizer = load_pretrained_encoder(directory)
        return cls(model, tokenizer, pooling, max_tokens)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled text vector."""
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, right-padded to the longest text, truncated."""
        if not texts:
            raise InputError("cannot build inputs for an empty batch of posts")
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        # token_type_ids would be all zeros, which is the model's default anyway.
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled vectors `[batch, hidden_size]`."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden(hidden, attention_mask, self.pooling)


class TextEncoderBackbone(Backbone):
    """A text-only router backbone: the post's text (title, OCR) through a text encoder.

    Images are ignored. Pooling follows `config.pooling`: "mean" over the attention mask (what
    all-MiniLM-L6-v2 was trained with), "cls", or "last_token" (the final [SEP]).
    """

    family: ClassVar[str] = "text_encoder"
    default_lora_targets: ClassVar[tuple[str, ...]] = BERT_LORA_TARGETS

    def __init__(self, config: BackboneConfig, text_encoder: TextEncoder) -> None:
        super().__init__(config)
        self.text_encoder = text_encoder

    @classmethod
    def load(cls, config: BackboneConfig, store_dir: Path) -> Self:
        """Load the encoder from `config.path` (resolved against `store_dir`), offline."""
        directory = resolve_path(config.path, store_dir)
        return cls(config, TextEncoder.load(directory, config.pooling, config.max_text_tokens))

    @property
    def hidden_size(self) -> int:
        """Width of the pooled text vector."""
        return self.text_encoder.hidden_size

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """Tokenised `Post.text()` of every post (CPU tensors)."""
        return self.text_encoder.tokenize([post.text() for post in posts])

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled text vectors `[batch, hidden_size]`."""
        return self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
