"""`radar quantize`: the int8 CPU router (ONNX Runtime dynamic int8 text encoder) on tiny stores.

Tiny random encoders (app.model.tiny_encoders) with LoRA adapters that change the output: the
store must merge them, keep the heads, extras and lexical head as they were, score within a
bounded distance of the float32 router, carry its own model_version, and load where any store
loads (`radar calibrate`, the service).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from app.cli import main
from app.model.config import RouterConfig, read_config
from app.model.errors import ModelStoreError
from app.model.lexical import LEXICAL_CONFIG, LEXICAL_WEIGHTS, LexicalHead
from app.model.post import Post
from app.model.quantize import OnnxEncoder, int8_embedding_rows, new_session, quantize_router
from app.model.store import (
    ADAPTER_DIR,
    BACKBONE_FILE,
    HEAD_FILE,
    copy_router,
    load_router,
    new_router,
    save_router,
)
from app.model.tiny_encoders import (
    TINY_IMAGE_SIZE,
    TINY_LORA,
    dual_encoder_router_config,
    text_encoder_router_config,
)
from app.service.app import create_app
from app.service.settings import Settings
from app.training.lexical import fit_lexical_model
from tests.conftest import random_images
from tests.evaluation.test_calibrate import balanced
from tests.evaluation.test_evaluate import CATEGORIES, write_posts
from tests.model.test_lexical import texts_and_labels
from tests.service.conftest import serve, write_thresholds

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Scores of the int8 router stay this close to the float32 one on the tiny encoders (measured:
# 0.002 on the seeded weights; the real router's drift is in docs/performance.md).
MAX_DRIFT = 0.02


def _posts(count: int, seed: int = 0) -> list[Post]:
    words = ("buy", "now", "free", "money", "cat", "dog", "video", "click", "here", "win")
    return [
        Post(
            title=" ".join(words[(i * k + seed) % len(words)] for k in range(1, 2 + i % 7)),
            ocr_text="link in bio" if i % 3 == 0 else "",
            images=random_images(i % 3, seed=i),
        )
        for i in range(count)
    ]


def _lora_router(config: RouterConfig, store: Path) -> Path:
    """A fresh router whose LoRA B matrices are non-zero (so merging them matters), saved.

    Seeded (MLP and LoRA A are initialised from torch's RNG): the drift bounds below are
    checked on these weights, not on whatever the RNG held when the test ran.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        router = new_router(config, store)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in router.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif name.startswith("heads.") or "no_image" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    texts, labels = texts_and_labels(120)
    models = {"lqc": fit_lexical_model(texts, labels)}
    router.lexical = LexicalHead(config.categories, models, {"lqc": 0.4}, max_chars=200)
    router.config = router.config.model_copy(update={"lexical_head": True})
    return save_router(router, store)


@pytest.fixture(scope="module")
def dual_store(tmp_path_factory: pytest.TempPathFactory, encoders: tuple[Path, Path]) -> Path:
    text, image = encoders
    config = dual_encoder_router_config(
        CATEGORIES,
        path=str(text),
        image_path=str(image),
        image_size=TINY_IMAGE_SIZE,
        max_images=3,
        max_text_tokens=32,
        lora=TINY_LORA,
        model_version="tiny-dual-1",
    )
    return _lora_router(config, tmp_path_factory.mktemp("dual") / "fp32")


@pytest.fixture(scope="module")
def dual_int8(tmp_path_factory: pytest.TempPathFactory, dual_store: Path) -> Path:
    return quantize_router(dual_store, tmp_path_factory.mktemp("dual") / "int8").out


def test_the_int8_store_merges_lora_and_keeps_the_rest(dual_store: Path, dual_int8: Path):
    config = read_config(dual_int8)
    assert config.model_version == "tiny-dual-1+int8"
    assert config.lora is None and not config.full_finetune and config.lexical_head
    assert config.quantization is not None
    assert config.quantization.source_model_version == "tiny-dual-1"
    assert {"mlp", "heads", "image_encoder", "extras"} <= set(config.quantization.fp32)
    assert (dual_int8 / config.quantization.text_encoder).is_file()
    assert not (dual_int8 / ADAPTER_DIR).exists() and not (dual_int8 / BACKBONE_FILE).exists()
    for name in (HEAD_FILE, LEXICAL_CONFIG, LEXICAL_WEIGHTS):
        assert (dual_int8 / name).read_bytes() == (dual_store / name).read_bytes(), name
    # A store without quantization writes no key: older stores and older code are unaffected.
    assert "quantization" not in json.loads((dual_store / "router.json").read_text())


def test_int8_scores_stay_close_to_float32(dual_store: Path, dual_int8: Path):
    fp32, int8 = load_router(dual_store), load_router(dual_int8)
    assert isinstance(int8.base_backbone.text_encoder.model, OnnxEncoder)
    assert int8.lexical is not None and int8.lexical.weights == fp32.lexical.weights
    posts = _posts(24)
    expected, got = fp32.predict_proba(posts), int8.predict_proba(posts)
    assert got.shape == expected.shape
    drift = (got - expected).abs().max().item()
    assert drift < MAX_DRIFT
    # The int8 text vectors are the LoRA-merged encoder's, not the pretrained one's.
    inputs = fp32.build_inputs(posts)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.inference_mode():
        tuned = fp32.base_backbone.text_encoder(ids, mask)
        with fp32.backbone.disable_adapter():
            pretrained = fp32.base_backbone.text_encoder(ids, mask)
        quantized = int8.base_backbone.text_encoder(ids, mask)
    assert (quantized - tuned).norm() < 0.2 * (quantized - pretrained).norm()
    # A post alone and in a batch (activation scales are per batch: bounded, not zero).
    alone = torch.cat([int8.predict_proba([post]) for post in posts[:6]])
    assert (alone - got[:6]).abs().max().item() < MAX_DRIFT


def test_quantizing_is_deterministic(dual_store: Path, dual_int8: Path, tmp_path: Path):
    again = quantize_router(dual_store, tmp_path / "again", model_version="v-int8")
    assert read_config(again.out).model_version == "v-int8"
    posts = _posts(8)
    first = load_router(dual_int8).predict_proba(posts)
    assert torch.equal(first, load_router(again.out).predict_proba(posts))


def test_a_text_encoder_store_without_lexical_head(encoders: tuple[Path, Path], tmp_path: Path):
    config = text_encoder_router_config(
        CATEGORIES, path=str(encoders[0]), lora=TINY_LORA, max_text_tokens=32
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        router = new_router(config, tmp_path / "fp32")
    save_router(router, tmp_path / "fp32")
    result = quantize_router(tmp_path / "fp32", tmp_path / "int8", per_channel=False)
    assert not read_config(result.out).lexical_head
    assert not (result.out / LEXICAL_CONFIG).exists()
    posts = _posts(10)
    drift = load_router(result.out).predict_proba(posts) - router.predict_proba(posts)
    assert drift.abs().max().item() < MAX_DRIFT


def test_fp32_embeddings_make_a_bigger_file(dual_store: Path, dual_int8: Path, tmp_path: Path):
    kept = quantize_router(dual_store, tmp_path / "emb", fp32_embeddings=True)
    assert "embeddings" in kept.fp32
    assert kept.onnx_bytes > (dual_int8 / "text_encoder.int8.onnx").stat().st_size


def test_embedding_tables_become_int8_rows_with_their_own_scale(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0.01, 10, (50, 1))
    table[3] = 0  # an all-zero row keeps a usable scale
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert int8_embedding_rows(model) == 1
    kinds = {i.name: i.data_type for i in model.graph.initializer}
    assert kinds == {"table.int8": TensorProto.INT8, "table.row_scale": TensorProto.FLOAT}
    save(model, str(tmp_path / "lookup.onnx"))
    ids = np.arange(50)
    (rows,) = new_session(tmp_path / "lookup.onnx", threads=1).run(None, {"ids": ids})
    # Each row within half a step of its own scale (its largest entry / 127).
    step = np.abs(table).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(rows - table) <= step / 2 + 1e-6)
    assert np.all(rows[3] == 0)


def test_what_cannot_be_quantized_is_refused(tiny_store: Path, dual_int8: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="encoder families"):
        quantize_router(tiny_store, tmp_path / "qwen")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_router(dual_int8, tmp_path / "twice")
    with pytest.raises(ModelStoreError, match="only scores, on the CPU"):
        load_router(dual_int8, trainable=True)


def test_a_missing_or_broken_onnx_file_names_the_file(dual_int8: Path, tmp_path: Path):
    broken = copy_router(dual_int8, tmp_path / "broken")
    onnx = broken / "text_encoder.int8.onnx"
    assert onnx.is_file()  # copy_router carries it
    onnx.write_bytes(b"not onnx")
    with pytest.raises(ModelStoreError, match=r"text_encoder\.int8\.onnx: not a loadable ONNX"):
        load_router(broken)
    onnx.unlink()
    with pytest.raises(ModelStoreError, match=r"text_encoder\.int8\.onnx: missing"):
        load_router(broken)


def test_cli_quantize_then_calibrate(
    dual_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", str(dual_store), "--out", str(out), "--model-version", "q-1"]) == 0
    assert "int8 CPU router saved" in capsys.readouterr().out
    val = write_posts(tmp_path / "val" / "val.jsonl", 72, balanced)
    thresholds = tmp_path / "int8.yaml"
    argv = ["calibrate", "--model", str(out), "--data", str(val), "--recall", "0.8"]
    argv += ["--guarantee", "quantile", "--min-positives", "10", "--out", str(thresholds)]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    assert yaml.safe_load(thresholds.read_text())["model_version"] == "q-1"


async def test_the_service_serves_the_int8_store(dual_int8: Path, tmp_path: Path) -> None:
    thresholds = tmp_path / "thresholds.yaml"
    write_thresholds(thresholds, dual_int8, "int8-1", 0.5)
    settings = Settings(
        model_dir=dual_int8,
        thresholds_path=thresholds,
        device="cpu",
        torch_threads=1,
        decision_log_path=tmp_path / "decision_log.sqlite3",
    )
    app = create_app(settings)
    async with serve(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        body = {"post_id": "p1", "title": "free money click here", "ocr_text": "win now"}
        answer = (await client.post("/route", json=body)).json()
    assert answer["model_version"] == "tiny-dual-1+int8"
    assert set(answer["scores"]) == set(CATEGORIES) and answer["flags"] == []
    expected = load_router(dual_int8).predict_proba([Post(title=body["title"], ocr_text="win now")])
    got = torch.tensor([[answer["scores"][c] for c in CATEGORIES]])
    assert (got - expected).abs().max().item() < 1e-5


def test_a_copy_of_an_int8_store_loads(dual_int8: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(dual_int8, tmp_path / "moved")
    assert read_config(moved).quantization == read_config(dual_int8).quantization
    assert load_router(moved).predict_proba(_posts(2)).shape == (2, len(CATEGORIES))
