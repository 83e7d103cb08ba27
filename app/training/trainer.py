"""The training loop: masked BCE + expert distillation on a LoRA router, on accelerate.

The same code runs as one process (`radar train`) or under `accelerate launch` (DDP, one
shard of the data per rank). What it saves is a model-store directory the service loads
unchanged, with the resolved config and the data fingerprint beside it.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from app.data.records import fingerprint
from app.model.router import Router
from app.model.store import save_router
from app.training.config import TrainConfig
from app.training.loop_parts import (
    IndexedCollate,
    IndexedDataset,
    JsonlLog,
    build_optimizer,
    enable_gradient_checkpointing,
    load_training_data,
    start_router,
    validate,
)
from app.training.losses import router_loss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "training_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainState:
    """Where a run is; saved in each checkpoint so `--resume` continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (this rank)
    samples: int = 0  # samples seen, all ranks


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    samples_per_s: float
    final_val: dict[str, Any] | None


class Trainer:
    """One run; `run()` trains, validates, checkpoints and saves the router."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="bf16" if cuda else "no",
            cpu=not cuda,
            # Seeded per-epoch shuffling, so a resumed run sees the same order.
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=cfg.seed
            ),
        )
        set_seed(cfg.seed, deterministic=not cuda)
        self.router = start_router(cfg)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.router)
        # A one-category run named by `categories` is an expert (`radar train-expert`).
        expert = cfg.categories[0] if cfg.categories and len(cfg.categories) == 1 else None
        self.train_data = load_training_data(cfg.data, self.router, cfg, expert=expert)
        if cfg.lam > 0 and not self.train_data.has_teacher:
            raise ValueError(
                f"{cfg.data}: λ = {cfg.lam} needs teacher scores, and no sample has any: "
                "run `radar teach` first, or pass --lambda 0 (masked BCE alone)"
            )
        self.val_data = (
            load_training_data(cfg.val, self.router, cfg, expert=expert) if cfg.val else None
        )
        loader = DataLoader(
            IndexedDataset(self.train_data.dataset),
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=IndexedCollate(self.router),
            # Its own generator: creating an iterator then draws no number from the global RNG,
            # so a resumed run's dropout masks match the uninterrupted run's.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        optimizer = build_optimizer(self.router, cfg)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            self.router, optimizer, loader
        )
        self.total_steps = self._total_steps()
        n = self.accelerator.num_processes  # accelerate steps the schedule once per process
        scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * self.total_steps) * n, self.total_steps * n
        )
        self.scheduler = self.accelerator.prepare(scheduler)
        self.state = TrainState()
        self.log = JsonlLog(cfg.out / LOG_FILE if self.is_main else None)
        self.seen: list[str] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _total_steps(self) -> int:
        per_epoch = math.ceil(len(self.loader) / self.cfg.grad_accum)
        total = per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def run(self) -> TrainResult:
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._load_checkpoint(cfg.resume)
        elif self.is_main and (cfg.out / LOG_FILE).exists():
            (cfg.out / LOG_FILE).unlink()  # a fresh run starts a fresh log
        self.log.write(
            event="start",
            config=_jsonable(cfg),
            total_steps=self.total_steps,
            processes=self.accelerator.num_processes,
            train_samples=len(self.train_data.dataset),
            skipped_lines=self.train_data.skipped,
        )
        started, samples_at_start = time.perf_counter(), self.state.samples
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            disable=not (cfg.progress and self.is_main),
            unit="step",
        )
        while self.state.step < self.total_steps and self.state.epoch < cfg.epochs:
            self._run_epoch(bar, started, samples_at_start)
        bar.close()
        rate = (self.state.samples - samples_at_start) / max(time.perf_counter() - started, 1e-9)
        final_val = self._validate() if self.val_data else None
        self._save_final(rate, final_val)
        return TrainResult(cfg.out, self.state.step, rate, final_val)

    def _run_epoch(self, bar: tqdm, started: float, samples_at_start: int) -> None:
        self.loader.set_epoch(self.state.epoch)
        loader = self.loader
        if self.state.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
        for batch in loader:
            self._micro_step(batch)
            if not self.accelerator.sync_gradients:
                continue
            self.state.step += 1
            bar.update(1)
            self._after_step(bar, started, samples_at_start)
            if self.state.step >= self.total_steps:
                break
        else:
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def _micro_step(self, batch: dict[str, Any]) -> None:
        with self.accelerator.accumulate(self.model):
            logits = self.model(batch["inputs"])
            loss = router_loss(
                logits,
                batch["labels"],
                batch["teacher"],
                batch["teacher_mask"],
                lam=self.cfg.lam,
                use_mask=self.cfg.use_mask,
            )
            self.accelerator.backward(loss.total)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.state.batches_in_epoch += 1
        self.state.samples += len(batch["ids"]) * self.accelerator.num_processes
        self.last_loss = loss.__class__(*(x.detach() if torch.is_tensor(x) else x for x in loss))
        if self.cfg.record_seen:
            self.seen.extend(self.train_data.post_ids[i] for i in batch["ids"])

    def _after_step(self, bar: tqdm, started: float, samples_at_start: int) -> None:
        cfg, step = self.cfg, self.state.step
        rate = (self.state.samples - samples_at_start) / max(time.perf_counter() - started, 1e-9)
        if step % cfg.log_every == 0 or step == self.total_steps:
            loss = self.last_loss
            entry = {
                "step": step,
                "epoch": self.state.epoch,
                "loss": float(loss.total),
                "mask": float(loss.mask),
                "distill": float(loss.distill),
                "lr": self.scheduler.get_last_lr()[0],
                "samples_per_s": round(rate, 2),
            }
            self.log.write(event="train", **entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", sps=f"{rate:.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
            self._validate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._save_checkpoint()

    def _validate(self) -> dict[str, Any] | None:
        """Per-category metrics on the validation set (main process; the others wait)."""
        result = None
        if self.is_main and self.val_data is not None:
            router: Router = self.accelerator.unwrap_model(self.model)
            result = validate(router, self.val_data, self.cfg.batch_size)
            self.log.write(event="val", step=self.state.step, **result)
        self.accelerator.wait_for_everyone()
        return result

    def _save_checkpoint(self) -> Path:
        directory = self.cfg.out / "checkpoints" / f"step-{self.state.step:06d}"
        self.accelerator.save_state(str(directory))
        if self.is_main:
            (directory / STATE_FILE).write_text(json.dumps(asdict(self.state)))
            (directory / CONFIG_FILE).write_text(json.dumps(_jsonable(self.cfg), indent=2))
            self.log.write(event="checkpoint", step=self.state.step, path=str(directory))
        self.accelerator.wait_for_everyone()
        return directory

    def _load_checkpoint(self, directory: Path) -> None:
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: not a checkpoint (no {STATE_FILE})")
        self.accelerator.load_state(str(directory))
        self.state = TrainState(**json.loads(state_file.read_text()))
        log.info("resumed from %s at step %d", directory, self.state.step)

    def _save_final(self, samples_per_s: float, final_val: dict[str, Any] | None) -> None:
        if self.cfg.record_seen:
            seen_dir = self.cfg.out / "seen"
            seen_dir.mkdir(parents=True, exist_ok=True)
            rank = self.accelerator.process_index
            (seen_dir / f"rank{rank}.json").write_text(json.dumps(self.seen))
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return
        router: Router = self.accelerator.unwrap_model(self.model)
        save_router(router, self.cfg.out)
        provenance = {
            "config": _jsonable(self.cfg),
            "data_fingerprint": fingerprint([self.cfg.data]),
            "val_fingerprint": fingerprint([self.cfg.val]) if self.cfg.val else None,
            "steps": self.state.step,
            "samples_per_s": round(samples_per_s, 2),
            "processes": self.accelerator.num_processes,
            "final_val": final_val,
        }
        (self.cfg.out / CONFIG_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        self.log.write(event="end", steps=self.state.step, samples_per_s=round(samples_per_s, 2))


def train(cfg: TrainConfig) -> TrainResult:
    """Train a router as `cfg` says and save it to `cfg.out`."""
    return Trainer(cfg).run()


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
