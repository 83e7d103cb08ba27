"""`radar train` end to end on the tiny Qwen3-VL router: loss goes down, resume is exact,
the saved router loads in the service, and 2 CPU processes (gloo) train on different shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from app.model.errors import ModelStoreError
from app.model.store import load_router
from app.training.config import TrainConfig
from app.training.trainer import train

CATEGORIES = ("lqc", "rcs", "fe")
REPO = Path(__file__).resolve().parents[2]


def write_dataset(directory: Path, name: str, n: int, *, teacher: bool = False) -> Path:
    """Disjoint annotation: post i is labelled for one category only; positives say 'spam'."""
    directory.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(directory / "red.png")
    path = directory / f"{name}.jsonl"
    with path.open("w") as file:
        for i in range(n):
            own = CATEGORIES[i % 3]
            positive = (i // 3) % 2
            record = {
                "post_id": f"{name}-{i}",
                "title": f"buy spam now {i}" if positive else f"my cat video {i}",
                "images": ["red.png"] if i % 5 == 0 else [],
                "labels": {c: (positive if c == own else -1) for c in CATEGORIES},
            }
            if teacher:
                record["teacher"] = {c: 0.9 if positive else 0.1 for c in CATEGORIES}
            file.write(json.dumps(record) + "\n")
    return path


def config(tiny_store: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "data": data,
        "model_config_path": tiny_store,
        "out": out,
        "batch_size": 6,
        "lam": 0.0,
        "lr": 1e-3,
        "head_lr": 1e-2,
        "progress": False,
        "log_every": 1,
    }
    return TrainConfig(**(values | overrides))


def saved_weights(store: Path) -> dict[str, torch.Tensor]:
    return load_file(store / "head.safetensors") | load_file(
        store / "adapter" / "adapter_model.safetensors"
    )


def log_events(store: Path, event: str) -> list[dict]:
    lines = (store / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def test_training_lowers_the_loss_and_saves_a_loadable_router(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 36, teacher=True)
    val = write_dataset(tmp_path / "data", "val", 18)
    cfg = config(tiny_store, data, tmp_path / "out", val=val, epochs=6, lam=0.5)
    result = train(cfg)
    losses = [e["loss"] for e in log_events(result.out, "train")]
    assert losses[-1] < losses[0]
    assert all(e["samples_per_s"] > 0 for e in log_events(result.out, "train"))
    val_events = log_events(result.out, "val")
    assert val_events and set(val_events[-1]["categories"]) == set(CATEGORIES)
    provenance = json.loads((result.out / "training_config.json").read_text())
    assert provenance["data_fingerprint"].startswith("sha256:")
    assert provenance["config"]["lam"] == 0.5
    router = load_router(result.out)
    assert router.categories == CATEGORIES
    assert router.config.model_version == "out"


def test_resume_continues_exactly(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 30)
    straight = train(config(tiny_store, data, tmp_path / "a", max_steps=4, checkpoint_every=2))
    checkpoint = straight.out / "checkpoints" / "step-000002"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = train(config(tiny_store, data, tmp_path / "b", max_steps=4, resume=checkpoint))
    assert resumed.steps == 4
    a, b = saved_weights(straight.out), saved_weights(resumed.out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = saved_weights(train(config(tiny_store, data, tmp_path / "c", max_steps=2)).out)
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # 2 steps differ from 4


def test_masked_vs_unmasked_losses_differ(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 12)
    masked = train(config(tiny_store, data, tmp_path / "m", max_steps=1))
    unmasked = train(config(tiny_store, data, tmp_path / "u", max_steps=1, use_mask=False))
    first = log_events(masked.out, "train")[0]["mask"]
    assert first != pytest.approx(log_events(unmasked.out, "train")[0]["mask"])


def test_lambda_without_teacher_scores_is_refused(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 6)
    with pytest.raises(ValueError, match="radar teach"):
        train(config(tiny_store, data, tmp_path / "out", lam=0.5))


def test_expert_trains_on_its_own_category_only(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 30)
    result = train(
        config(
            tiny_store,
            data,
            tmp_path / "expert",
            categories=("rcs",),
            max_steps=2,
            record_seen=True,
        )
    )
    assert load_router(result.out).categories == ("rcs",)
    seen = json.loads((result.out / "seen" / "rank0.json").read_text())
    assert seen and all(int(i.split("-")[1]) % 3 == 1 for i in seen)  # only rcs-annotated


def test_trained_router_serves(tiny_store, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.service.app import create_app
    from app.service.settings import Settings

    data = write_dataset(tmp_path / "data", "train", 12)
    out = train(config(tiny_store, data, tmp_path / "served", max_steps=1)).out
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text(
        yaml.safe_dump(
            {
                "version": "t1",
                "model_version": "served",
                "categories": {c: {"tau": 0.5} for c in CATEGORIES},
            }
        )
    )
    settings = Settings(model_dir=out, thresholds_path=thresholds, device="cpu")
    with TestClient(create_app(settings)) as client:
        response = client.post("/route", json={"post_id": "p", "title": "buy spam now"})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "served"


@pytest.mark.slow
def test_two_processes_train_on_different_shards(tiny_store, tmp_path) -> None:
    data = write_dataset(tmp_path / "data", "train", 24)
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    command = [
        str(launcher),
        "launch",
        "--config_file",
        str(REPO / "deploy" / "accelerate" / "ddp_cpu_2proc.yaml"),
        "-m",
        "app.cli",
        "train",
        "--data",
        str(data),
        "--model-config",
        str(tiny_store),
        "--out",
        str(out),
        "--lambda",
        "0",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--record-seen",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((out / "seen" / "rank0.json").read_text())
    rank1 = json.loads((out / "seen" / "rank1.json").read_text())
    assert len(rank0) == len(rank1) == 12  # 3 steps × 4 posts each
    assert not set(rank0) & set(rank1)
    assert log_events(out, "start")[0]["processes"] == 2
    assert load_router(out).categories == CATEGORIES


def scripted_validation(values: list[float]):
    """A stand-in for `validate` whose selection metric follows `values`, call by call."""
    calls = iter(values)

    def fake(router, data, batch_size) -> dict:
        value = next(calls)
        averages = dict.fromkeys(("pr_auc", "r_at_p60", "apr_r90", "apr_r95"), value)
        return {"categories": {}, "averages": averages, "n_defined": 3}

    return fake


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def test_best_epoch_is_saved_early_stop_and_resume_keep_it(
    tiny_store, tmp_path, monkeypatch
) -> None:
    """Validation peaks after epoch 1 and then only worsens: the saved router is epoch 1's
    (the checkpoint of its last step), the run stops after 2 epochs without improvement,
    and a run resumed past the best step saves the same weights."""
    data = write_dataset(tmp_path / "data", "train", 30)  # 5 steps per epoch
    val = write_dataset(tmp_path / "data", "val", 6)
    common = {"val": val, "epochs": 4, "early_stop_patience": 2}
    monkeypatch.setattr("app.training.trainer.validate", scripted_validation([0.9, 0.5, 0.4, 0.3]))
    straight = train(config(tiny_store, data, tmp_path / "a", checkpoint_every=5, **common))
    assert (straight.steps, straight.selected_step, straight.stopped_early) == (15, 5, True)
    provenance = json.loads((straight.out / "training_config.json").read_text())
    assert provenance["selected"] | {"val": None} == {
        "step": 5,
        "epoch": 1,
        "metric": "pr_auc",
        "value": 0.9,
        "val": None,
    }
    assert provenance["final_val"]["averages"]["pr_auc"] == 0.9
    assert provenance["last_val"]["averages"]["pr_auc"] == 0.4
    saved = load_router(straight.out).state_dict()
    chosen = checkpoint_weights(straight.out / "checkpoints" / "step-000005")
    last = checkpoint_weights(straight.out / "checkpoints" / "step-000015")
    assert saved.keys() == chosen.keys()
    assert all(torch.equal(saved[k], chosen[k]) for k in chosen)
    assert any(not torch.equal(saved[k], last[k]) for k in last)
    # Resumed after epoch 2's last step, before its validation (0.5, then 0.4: stop).
    checkpoint = straight.out / "checkpoints" / "step-000010"
    monkeypatch.setattr("app.training.trainer.validate", scripted_validation([0.5, 0.4, 0.3]))
    resumed = train(config(tiny_store, data, tmp_path / "b", resume=checkpoint, **common))
    assert (resumed.steps, resumed.selected_step, resumed.stopped_early) == (15, 5, True)
    a, b = saved_weights(straight.out), saved_weights(resumed.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_saves_loads_and_scores_the_same(tiny_store, tmp_path) -> None:
    from app.data.records import load_post, load_records
    from app.model.backbones import load_backbone
    from app.model.config import read_config
    from app.training.trainer import Trainer

    data = write_dataset(tmp_path / "data", "train", 12)
    trainer = Trainer(config(tiny_store, data, tmp_path / "full", max_steps=2, full_finetune=True))
    out = trainer.run().out
    trained = trainer.accelerator.unwrap_model(trainer.model)
    stored = json.loads((out / "router.json").read_text())
    assert stored["full_finetune"] is True and stored["lora"] is None
    assert not (out / "adapter").exists()
    weights = load_file(out / "backbone.safetensors")
    assert weights and not any(k.startswith("model.visual.") for k in weights)  # frozen tower
    pretrained = dict(
        load_backbone(read_config(tiny_store).backbone, tiny_store).named_parameters()
    )
    assert any(not torch.equal(v, pretrained[k]) for k, v in weights.items())
    for name, param in trained.base_backbone.named_parameters():
        if name.startswith("model.visual."):
            assert not param.requires_grad and torch.equal(param, pretrained[name])
    posts = [load_post(r) for r in load_records(data, CATEGORIES).records[:6]]
    reloaded = load_router(out)
    assert torch.equal(reloaded.predict_proba(posts), trained.predict_proba(posts))
    # Loaded to score: nothing trainable (so a frozen image tower can use a feature cache).
    assert not any(
        p.requires_grad
        for name, p in reloaded.base_backbone.named_parameters()
        if not name.startswith("extras.")
    )
    (out / "backbone.safetensors").unlink()
    with pytest.raises(ModelStoreError, match="full_finetune"):
        load_router(out)
