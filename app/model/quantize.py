"""The int8 CPU router: `radar quantize SRC --out DST` and the loader of what it writes.

What is quantized, and why this runtime. The text encoder (all-MiniLM-L6-v2 in the shipped
router: 6 BERT layers) is what costs time on a CPU; the MLP and heads are a few small matrix
products and stay float32, and so does the image encoder, a frozen pretrained EfficientNet-Lite0
whose convolutions dynamic quantization does not cover. The text encoder (LoRA merged into it
first, for a LoRA store) is exported to ONNX and quantized by ONNX Runtime's dynamic int8
(`quantize_dynamic`): weights int8, per output channel by default, activations quantized per
batch at run time, so the result depends on the weights alone and quantizing twice gives the
same weights. Picked by measurement on the shipped router (docs/performance.md, "int8 CPU
router", `benchmarks/quantize_bench.py`): torchao 0.18's `Int8DynamicActivationInt8WeightConfig`
on the same Linear layers ran a batch of 32 about 25x *slower* than float32 in eager mode on
these CPUs (its int32 matmul has no fast CPU kernel without `torch.compile`), while ONNX
Runtime's int8 graph ran the forward 1.3x faster at batch 32 and 2.2x at batch 1.
`torch.ao.quantization` is deprecated.

The embedding tables are stored int8 too, with one scale per row (`int8_embedding_rows`: a
lookup gains no speed from it, but the file shrinks from 59 to 24 MB, the fine-tuned word
embeddings being half the model), unless `fp32_embeddings` keeps them float32; LayerNorm,
softmax, GELU and the attention products between activations always run in float32.

One property float32 has and this lacks: ONNX Runtime quantizes a product's input with one
scale for the whole batch (`DynamicQuantizeLinear` is per tensor), so a post's scores move with
the posts it is batched with: up to 0.06 on the shipped router, against a drift from float32 of
0.08 at most and 0.005 on average (docs/performance.md).

The store (`app.model.store`): router.json with `lora: null`, no `full_finetune`, and a
`quantization` entry (runtime, method, the ONNX file's name, what stayed float32, the source's
model_version); `text_encoder.int8.onnx`; the source's `head.safetensors` (MLP, heads, extras)
and lexical head, copied unchanged. `load_router` builds the backbone from its pretrained files
as for any store (the tokenizer, the image encoder) and then runs the ONNX graph in place of
the pretrained text encoder. The store has its own `model_version` (default
`<source's>+int8`): its scores are not the float32 router's, so thresholds calibrated for one
are refused by the other. Exporting needs `onnx` and `onnxscript`; serving only `onnxruntime`.
"""

import contextlib
import io
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from app.model.config import QuantizationSettings, read_config
from app.model.errors import ModelStoreError
from app.model.files import is_file
from app.model.lexical import LEXICAL_CONFIG, LEXICAL_WEIGHTS
from app.model.store import HEAD_FILE, load_router, relocate_config, write_config

QUANTIZED_FAMILIES = ("text_encoder", "dual_encoder")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
# Always float32 in a quantized store (the embeddings join them with `fp32_embeddings`).
KEPT_FP32 = ("mlp", "heads", "extras", "image_encoder", "layer_norm", "attention_scores")


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    model_version: str
    onnx_bytes: int
    fp32: tuple[str, ...]


class OnnxEncoder(nn.Module):
    """Stands in for the Hugging Face encoder inside `TextEncoder`: the same call and output
    (`.last_hidden_state`), computed by an ONNX Runtime session on the CPU."""

    def __init__(self, session: Any, config: Any) -> None:
        super().__init__()
        self.session = session
        self.config = config  # the pretrained encoder's: hidden size, position table

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.numpy()}
        (hidden,) = self.session.run([OUTPUT_NAME], feeds)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def new_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (default: torch's).

    Its threads sleep when idle, as the service's OpenMP threads do (`OMP_WAIT_POLICY=PASSIVE`,
    app/service/server.py): spinning ones would take the event loop's core between batches.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its optimizer's notes are not ours to show
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_quantized_text_encoder(
    backbone: nn.Module, store_dir: Path, settings: QuantizationSettings
) -> None:
    """Replace `backbone.text_encoder`'s encoder by the store's int8 ONNX graph."""
    path = Path(store_dir) / settings.text_encoder
    if Path(settings.text_encoder).name != settings.text_encoder:
        raise ModelStoreError(path, "quantization.text_encoder must be a file name in the store")
    if not is_file(path):
        raise ModelStoreError(path, "missing (router.json asks for an int8 text encoder)")
    text_encoder = getattr(backbone, "text_encoder", None)
    if text_encoder is None:
        raise ModelStoreError(path, f"a {type(backbone).__name__} has no text encoder to replace")
    try:
        session = new_session(path)
    except Exception as exc:  # onnxruntime raises its own exception types for a broken file
        raise ModelStoreError(path, f"not a loadable ONNX model: {exc}") from None
    names = tuple(i.name for i in session.get_inputs())
    outputs = [o.name for o in session.get_outputs()]
    if set(names) != set(INPUT_NAMES) or OUTPUT_NAME not in outputs:
        raise ModelStoreError(path, f"inputs {names} and outputs {outputs} are not an encoder's")
    width = session.get_outputs()[outputs.index(OUTPUT_NAME)].shape[-1]
    if width != text_encoder.hidden_size:
        raise ModelStoreError(
            path, f"hidden width {width}, the pretrained encoder's is {text_encoder.hidden_size}"
        )
    text_encoder.model = OnnxEncoder(session, text_encoder.model.config)


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_encoder(model: nn.Module, path: Path, max_tokens: int) -> None:
    """Export a Hugging Face encoder to ONNX (float32), batch and length dynamic."""
    vocab = int(model.config.vocab_size)
    # Batch and length differ from each other and from 1, so neither gets specialised.
    ids = torch.randint(
        5, vocab, (3, min(11, max_tokens)), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a padded row: the mask must stay an input, not a constant
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=1, max=max_tokens)
    shapes = {name: {0: batch, 1: length} for name in INPUT_NAMES}
    # The exporter reports every step on stdout and warns about its own internals (deprecated
    # pytree calls, axis renames); a CLI command prints its own summary.
    quiet = warnings.catch_warnings()
    with quiet, contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _LastHidden(model).eval(),
            (ids, mask),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=shapes,
            dynamo=True,
        )
    program.save(str(path), external_data=False)


def quantize_onnx(source: Path, target: Path, *, per_channel: bool, fp32_embeddings: bool) -> None:
    """ONNX Runtime dynamic int8 of the encoder's weight products; embedding tables int8 per
    row unless `fp32_embeddings`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        # Only products with a weight: those between activations (attention) stay float32.
        extra_options={"MatMulConstBOnly": True},
    )
    if not fp32_embeddings:
        import onnx

        model = onnx.load(str(target))
        int8_embedding_rows(model)
        onnx.save(model, str(target))


def int8_embedding_rows(model: Any) -> int:
    """Store each embedding table (a float32 initializer read only by a `Gather` on axis 0)
    as int8 with one scale per row; returns how many tables. In place.

    ONNX Runtime's own `Gather` quantization gives a table one scale for all its rows (with
    it, the shipped router's offensive APR@R90 moved by 0.9 points on the test split; with
    this, by 0.4); a scale per row (per token) keeps each entry within half a step of its row's
    largest entry / 127. The lookup becomes
    `Gather(int8 table) → Cast → Mul(Gather(row scales))`: a lookup's cost, in float32 after.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    tables = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes, done = [], 0
    for node in graph.node:
        nodes.append(node)
        name = node.input[0] if node.input else ""
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or name not in tables or readers[name] != 1 or axis != 0:
            continue
        table = numpy_helper.to_array(tables[name])
        if table.ndim != 2:
            continue
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        rows = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(tables[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(rows, f"{name}.int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}.row_scale"),
            ]
        )
        out, ids = node.output[0], node.input[1]
        node.input[0], node.output[0] = f"{name}.int8", f"{out}.int8"
        nodes += [
            helper.make_node("Gather", [f"{name}.row_scale", ids], [f"{out}.scale"], axis=0),
            helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out]),
        ]
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def merge_lora(wrapped: PeftModel) -> nn.Module:
    """The backbone with its LoRA deltas added into the base weights, adapters removed.

    What peft's `merge_and_unload` does, layer by layer: that method first reads the model's
    `config` as a Hugging Face config, and a backbone's is our pydantic `BackboneConfig`.
    """
    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return wrapped.unload()


def quantize_router(
    source: Path,
    out: Path,
    *,
    model_version: str | None = None,
    per_channel: bool = True,
    fp32_embeddings: bool = False,
) -> QuantizeResult:
    """Write the int8 CPU store of the router at `source` to `out` (see the module)."""
    source, out = Path(source), Path(out)
    config = read_config(source)
    if config.quantization is not None:
        raise ValueError(f"{source} is already quantized; start from the float32 router")
    if config.backbone.family not in QUANTIZED_FAMILIES:
        raise ValueError(
            f"radar quantize takes the encoder families {QUANTIZED_FAMILIES}, "
            f"not {config.backbone.family!r}"
        )
    if out.resolve() == source.resolve():
        raise ValueError("--out must be another directory than the source store")
    router = load_router(source)
    if isinstance(router.backbone, PeftModel):
        router.backbone = merge_lora(router.backbone)
    encoder = router.base_backbone.text_encoder
    fp32 = KEPT_FP32 + (("embeddings",) if fp32_embeddings else ())
    settings = QuantizationSettings(
        per_channel=per_channel, fp32=fp32, source_model_version=config.model_version
    )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="radar-quantize-") as scratch:
        exported = Path(scratch) / "text_encoder.fp32.onnx"
        export_encoder(encoder.model, exported, encoder.max_tokens)
        quantize_onnx(
            exported,
            out / settings.text_encoder,
            per_channel=per_channel,
            fp32_embeddings=fp32_embeddings,
        )
    for name in (HEAD_FILE, LEXICAL_CONFIG, LEXICAL_WEIGHTS):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    version = model_version or f"{config.model_version}+int8"
    quantized = relocate_config(config, source, out).model_copy(
        update={
            "model_version": version,
            "lora": None,
            "full_finetune": False,
            "quantization": settings,
        }
    )
    write_config(quantized, out)
    return QuantizeResult(out, version, (out / settings.text_encoder).stat().st_size, fp32)
