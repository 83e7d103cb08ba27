"""GPU checks and benchmark for the Qwen3-VL backbone (runs where CUDA exists).

1. Parity: our input builder (`Qwen3VLBackbone.build_inputs`, which works without torchvision)
   against the real `Qwen3VLProcessor` (needs torchvision: only on the GPU machine), on the
   tiny router's tokenizer and image processor: input ids, mm_token_type_ids, pixel values,
   grids, and the pooled vectors of the model on both.
2. The tiny router on CUDA in bf16 against the CPU in fp32.
3. A Qwen3-VL-4B-shaped router (config of Qwen3-VL-4B, random bf16 weights) on realistic posts
   (3 images + title + OCR): forward posts/s, tokens/s and model FLOPs utilisation.

Usage: python benchmarks/gpu_qwen3vl.py [--out results.json] [--small]  (--small: CPU smoke run)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen3VLModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.model.backbones.qwen3_vl import Qwen3VLBackbone
from app.model.config import BackboneConfig, RouterConfig
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router
from app.model.tiny import build_tokenizer, make_tiny_router

ATTN = "sdpa"
H200_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100/H200 SXM (NVIDIA datasheet)
OCR = "limited offer follow the link in bio for free followers and cheap likes " * 4


def images(count: int, size: tuple[int, int], seed: int) -> tuple[Image.Image, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        Image.fromarray(
            torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        )
        for _ in range(count)
    )


def parity(report: dict) -> None:
    """Our builder vs the real Qwen3VLProcessor, on the tiny router."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    try:
        video_processor = Qwen3VLVideoProcessor()
    except ImportError:  # no torchvision here
        report["parity"] = "skipped: Qwen3VLProcessor needs torchvision"
        return
    store = make_tiny_router(Path(tempfile.mkdtemp()) / "tiny")
    router = load_router(store)
    backbone = router.base_backbone
    processor = Qwen3VLProcessor(
        image_processor=backbone.image_processor,
        tokenizer=backbone.tokenizer,
        video_processor=video_processor,
        chat_template=backbone.tokenizer.chat_template,
    )
    posts = [
        Post(title="hello world", ocr_text=""),
        Post(title="buy cheap followers", ocr_text="free money", images=images(1, (50, 40), 1)),
        Post(title="street food tour", ocr_text="noodles", images=images(3, (64, 33), 2)),
    ]
    checks = []
    for post in posts:
        ours = backbone.build_inputs([post])
        before, after = backbone.prompt_parts(len(post.images))
        theirs = processor(
            text=[before + post.text() + after],
            images=list(post.images) or None,
            return_tensors="pt",
        )
        same = {
            "input_ids": torch.equal(ours["input_ids"], theirs["input_ids"]),
            "attention_mask": torch.equal(ours["attention_mask"], theirs["attention_mask"]),
            "mm_token_type_ids": torch.equal(
                ours["mm_token_type_ids"], theirs["mm_token_type_ids"].long()
            ),
        }
        if post.images:
            same["image_grid_thw"] = torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
            same["pixel_values_maxdiff"] = float(
                (ours["pixel_values"] - theirs["pixel_values"]).abs().max()
            )
        with torch.inference_mode():
            pooled_ours = backbone(ours)
            pooled_theirs = backbone({k: v for k, v in theirs.items()})
        same["pooled_maxdiff"] = float((pooled_ours - pooled_theirs).abs().max())
        checks.append(same)
    report["parity"] = checks
    if torch.cuda.is_available():
        cpu = router.predict_proba(posts)
        gpu = load_router(store, "cuda").predict_proba(posts)
        report["tiny_cuda_bf16_vs_cpu_fp32_maxdiff"] = float((cpu - gpu).abs().max())


def qwen3_vl_4b_config(tokenizer: PreTrainedTokenizerBase, small: bool) -> dict:
    """Qwen3-VL-4B-Instruct's shape; token ids are the stand-in tokenizer's."""
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        pad_token_id=0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=24,
        hidden_size=1024,
        intermediate_size=4096,
        num_heads=16,
        out_hidden_size=2560,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17],
    )
    if small:
        text.update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters={**text["rope_parameters"], "mrope_section": [4, 6, 6]},
        )
        vision.update(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            deepstack_visual_indexes=[0],
        )
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def forward_flops(model: Qwen3VLModel, inputs: dict) -> float:
    """2·N per token for the matmuls plus 4·L·d·s per token for attention (PaLM's count)."""
    text_cfg, vis_cfg = model.config.text_config, model.config.vision_config
    lm_params = sum(
        p.numel() for n, p in model.language_model.named_parameters() if "embed_tokens" not in n
    )
    vis_params = sum(p.numel() for p in model.visual.parameters())
    lengths = inputs["attention_mask"].sum(1).double()
    flops = 2 * lm_params * lengths.sum()
    d_attn = text_cfg.num_attention_heads * text_cfg.head_dim
    flops += 4 * text_cfg.num_hidden_layers * d_attn * (lengths**2).sum()
    if "image_grid_thw" in inputs:
        patches = inputs["image_grid_thw"].prod(-1).double()
        flops += 2 * vis_params * patches.sum()
        flops += 4 * vis_cfg.depth * vis_cfg.hidden_size * (patches**2).sum()
    return float(flops)


def time_vision(model: Qwen3VLModel, inputs: dict, reps: int, device: torch.device) -> float:
    """Seconds per call of the vision tower alone (the rest of the forward is the LM)."""
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    model.get_image_features(pixels, grid)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        model.get_image_features(pixels, grid)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def benchmark_4b(report: dict, small: bool) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_tokenizer()
    config = Qwen3VLConfig(**qwen3_vl_4b_config(tokenizer, small))
    started = time.perf_counter()
    with torch.device(device):
        model = Qwen3VLModel._from_config(config, dtype=dtype, attn_implementation=ATTN)
    model.eval()
    report["init_s"] = round(time.perf_counter() - started, 1)
    report["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    bconfig = BackboneConfig(family="qwen3_vl", path="-", max_text_tokens=512, max_images=3)
    backbone = Qwen3VLBackbone(bconfig, model, tokenizer, processor)
    router = (
        Router(
            RouterConfig(
                model_version="bench-4b",
                categories=("lqc", "rcs", "fe"),
                backbone=bconfig,
                lora=None,
            ),
            backbone,
        )
        .place(device)
        .eval()
    )
    side = (256, 192) if small else (512, 384)
    rows = []
    for batch in (2,) if small else (8, 16, 32):
        posts = [
            Post(
                title=f"post {i}: buy cheap followers today",
                ocr_text=OCR,
                images=images(3, side, i),
            )
            for i in range(batch)
        ]
        t0 = time.perf_counter()
        cpu_inputs = router.build_inputs(posts)
        preprocess_s = time.perf_counter() - t0
        inputs = backbone.prepare_for_device(
            {k: v.pin_memory() if device.type == "cuda" else v for k, v in cpu_inputs.items()}
        )
        flops = forward_flops(model, inputs)
        tokens = int(inputs["attention_mask"].sum())
        with torch.inference_mode():
            for _ in range(2):
                router(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reps = 2 if small else 5
            t0 = time.perf_counter()
            for _ in range(reps):
                router(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / reps
            vision_s = time_vision(model, inputs, reps, device) if "pixel_values" in inputs else 0
        rows.append(
            {
                "batch": batch,
                "tokens_per_post": tokens / batch,
                "forward_ms": round(per * 1e3, 1),
                "posts_per_s": round(batch / per, 1),
                "tokens_per_s": round(tokens / per),
                "tflops": round(flops / per / 1e12, 1),
                "mfu": round(flops / per / H200_BF16_PEAK, 3),
                "preprocess_ms": round(preprocess_s * 1e3, 1),
                "preprocess_posts_per_s": round(batch / preprocess_s, 1),
                "vision_tower_ms": round(vision_s * 1e3, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    report["forward"] = rows
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    args = parser.parse_args()
    global ATTN
    ATTN = args.attn
    report: dict = {"torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    if not args.skip_parity:
        parity(report)
        print(json.dumps(report, indent=1), flush=True)
    benchmark_4b(report, args.small)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
