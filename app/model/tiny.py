"""A tiny random Qwen3-VL router that builds offline in seconds: the test double of the real one.

No model hub is reachable (DESIGN.md, environment facts), so the real loading code is tested on
this: a randomly initialised `Qwen3VLModel` small enough for a CPU, a byte-level BPE tokenizer
trained here on a built-in corpus with Qwen's special tokens and a Qwen-style chat template, and
a `Qwen2VLImageProcessorPil`, all saved in the `from_pretrained` layout under `backbone/`, then
wrapped into a router and saved in the model-store layout.
"""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from app.model.backbones.qwen3_vl import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)
from app.model.config import BackboneConfig, HeadConfig, LoraSettings, RouterConfig
from app.model.store import new_router, save_router

BACKBONE_DIR = "backbone"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)
# Qwen2's pre-tokenizer split (digits one by one, newlines apart), so token boundaries behave
# like the real tokenizer's around the chat template.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A Qwen3-VL-style template: an image entry renders as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = (
    "Title: my morning routine with coffee and a walk in the park",
    "OCR: follow for more daily vlogs and cooking tips",
    "Title: buy cheap followers now, click the link in bio for a limited offer",
    "OCR: free money giveaway, send your bank details to claim the prize",
    "Title: funny cat compilation part 3, the best moments of the week",
    "OCR: subscribe and share with your friends",
    "Title: how to fix a flat bicycle tire in five minutes",
    "Title: street food tour of the night market, noodles, dumplings and tea",
    "OCR: warning, graphic content, viewer discretion is advised",
    "Title: this miracle pill cures every disease, doctors hate it",
    "OCR: limited time only, 50% off, order today",
    "Title: low quality repost of a repost, watch till the end",
    "Title: travel diary: mountains, lakes and a long train ride home",
    "OCR: the quick brown fox jumps over the lazy dog 0123456789",
    "Score this post for content moderation risk.",
    "Video of a dance challenge with music, friends and a happy birthday song",
    "Review of a new phone camera, battery life, screen and price",
    "A short tutorial about painting flowers with watercolors",
    "Breaking news about the weather: heavy rain and strong wind tonight",
    "Sports highlights: the team scored two goals in the second half",
    "Unboxing a gaming keyboard with bright lights, mechanical switches and a long cable",
    "Grandmother shares her secret recipe for apple pie, cinnamon, butter and sugar",
    "Fitness challenge: thirty push ups every morning for a whole month",
    "Learn English vocabulary quickly with these simple memory tricks",
    "Investment scam alert: nobody can guarantee doubled returns within a week",
    "Counterfeit watches and designer bags sold here, message privately for prices",
    "Dangerous stunt on a rooftop, please do not try this at home",
    "Political debate clip with subtitles, comments are turned off",
    "Beautiful sunset over the ocean, waves, sand and seagulls flying",
    "Product review: wireless earbuds, noise cancelling, comfortable fit",
    "Homework help for mathematics: fractions, decimals, percentages and geometry",
    "Puppy training basics: sit, stay, come, and walking on a leash",
    "Concert recording from the front row, loud guitars and drums",
    "Gardening tips for tomatoes, peppers, cucumbers and fresh herbs",
    "Spam comment: visit my profile, win an iPhone, hurry before midnight",
    "Misleading headline about celebrities, rumours and unverified gossip",
    "Behind the scenes of a film shoot, cameras, actors and makeup artists",
    "Science experiment with baking soda and vinegar, safe for children",
    "Car repair tutorial: changing the oil, filters, brakes and spark plugs",
    "Wedding highlights with flowers, speeches, dancing and a big cake",
    "Weekly grocery haul on a budget, vegetables, rice, beans and eggs",
    "Minecraft building timelapse: castle, village, bridges and towers",
    "Language exchange meetup: practicing Spanish, French, German and Japanese",
    "Hiking safety checklist: water, map, jacket, first aid kit and snacks",
    "Repost without credit, blurry video, watermark removed, low effort",
)


def make_tiny_router(
    out_dir: Path,
    categories: tuple[str, ...] = ("lqc", "rcs", "fe"),
    seed: int = 0,
    model_version: str = "tiny-qwen3vl-1",
) -> Path:
    """Write a tiny random Qwen3-VL router into `out_dir` (model-store layout) and return it.

    Deterministic for a given `seed`; runs offline on a CPU in a few seconds.
    """
    out_dir = Path(out_dir)
    backbone_dir = out_dir / BACKBONE_DIR
    backbone_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(backbone_dir))
    build_image_processor().save_pretrained(str(backbone_dir))
    torch.manual_seed(seed)
    Qwen3VLModel(tiny_model_config(tokenizer)).save_pretrained(str(backbone_dir))

    config = RouterConfig(
        model_version=model_version,
        categories=tuple(categories),
        backbone=BackboneConfig(family="qwen3_vl", path=BACKBONE_DIR, max_text_tokens=128),
        head=HeadConfig(hidden_dims=(32,), dropout=0.1),
        lora=LoraSettings(r=8, alpha=16, dropout=0.05),
    )
    # Reseeded so the LoRA and head initialisation do not depend on what ran before.
    torch.manual_seed(seed)
    save_router(new_router(config, out_dir), out_dir)
    return out_dir


def build_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens and chat template, trained on `CORPUS`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen-style image preprocessing at toy resolution: 1 to 4 visual tokens per image."""
    return Qwen2VLImageProcessorPil(
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
    )


def tiny_model_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """DESIGN.md's tiny Qwen3-VL config; the multimodal token ids are the tokenizer's."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "pad_token_id": ids["<|endoftext|>"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[VISION_START_TOKEN],
        vision_end_token_id=ids[VISION_END_TOKEN],
    )
