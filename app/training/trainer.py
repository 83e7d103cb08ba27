"""The training loop: masked BCE + expert distillation on a LoRA router, on accelerate.

The same code runs as one process (`radar train`) or under `accelerate launch` (DDP, one
shard of the data per rank). What it saves is a model-store directory the service loads
unchanged, with the resolved config and the data fingerprint beside it.

With a validation set the run validates at the end of every epoch (and every `eval_every`
steps, and at its last step) and saves the weights of the best validation by
`select_metric`, not the last step's: later epochs can overfit, and the selected step and
its figures are recorded in `training_config.json`. `early_stop_patience` ends the run
after that many epochs without a better validation.
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
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from app.data.records import fingerprint
from app.data.scoring import text_lengths
from app.model.router import Router
from app.model.store import save_router
from app.training.config import TrainConfig
from app.training.loop_parts import (
    IndexedCollate,
    IndexedDataset,
    JsonlLog,
    LengthBucketSampler,
    build_optimizer,
    enable_gradient_checkpointing,
    load_training_data,
    restore_weights,
    selection_value,
    start_router,
    trainable_weights,
    validate,
)
from app.training.losses import router_loss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "training_config.json"
LOG_FILE = "train_log.jsonl"
# In a checkpoint: the best validation's trainable weights, when they are not the checkpoint's.
BEST_FILE = "best_weights.safetensors"


@dataclass
class TrainState:
    """Where a run is; saved in each checkpoint so `--resume` continues exactly.

    The validation fields are the main process's (the only one that validates); the others
    read them from the checkpoint like the rest.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (this rank)
    samples: int = 0  # samples seen, all ranks
    validated_step: int | None = None  # the step last validated (each step at most once)
    last_val: dict[str, Any] | None = None
    best_step: int | None = None  # the best validation by `select_metric` so far
    best_epoch: int | None = None  # 1-based: the epoch that step ends or falls in
    best_value: float | None = None
    best_val: dict[str, Any] | None = None
    improved_in_epoch: bool = False
    epochs_without_improvement: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int  # optimizer steps trained
    samples_per_s: float  # training only: validation time left out
    final_val: dict[str, Any] | None  # validation of the saved weights
    selected_step: int  # the step whose weights were saved
    stopped_early: bool = False


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
        self.sampler = (
            LengthBucketSampler(
                text_lengths(self.router, self.train_data.dataset), cfg.batch_size, seed=cfg.seed
            )
            if cfg.length_buckets
            else None
        )
        loader_kwargs: dict[str, Any] = {
            "collate_fn": IndexedCollate(self.router),
            # Its own generator: creating an iterator then draws no number from the global RNG,
            # so a resumed run's dropout masks match the uninterrupted run's.
            "generator": torch.Generator().manual_seed(cfg.seed),
        }
        if self.sampler is not None:
            loader_kwargs["batch_sampler"] = self.sampler
        else:
            loader_kwargs |= {"batch_size": cfg.batch_size, "shuffle": True}
        loader = DataLoader(IndexedDataset(self.train_data.dataset), **loader_kwargs)
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
        self.best_weights: dict[str, torch.Tensor] | None = None  # main process only
        self.val_seconds = 0.0  # left out of samples/s

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
        while (
            self.state.step < self.total_steps
            and self.state.epoch < cfg.epochs
            and not self.state.stopped_early
        ):
            self._run_epoch(bar, started, samples_at_start)
        bar.close()
        rate = self._rate(started, samples_at_start)
        self._validate()  # the last step, unless an epoch's end just did
        self._select_best()
        self._save_final(rate, time.perf_counter() - started)
        state = self.state
        selected = state.best_step if state.best_step is not None else state.step
        return TrainResult(
            cfg.out, state.step, rate, self._saved_val(), selected, state.stopped_early
        )

    def _saved_val(self) -> dict[str, Any] | None:
        """The validation of the weights saved: the best one, else (no defined metric) the last."""
        return self.state.best_val if self.state.best_step is not None else self.state.last_val

    def _rate(self, started: float, samples_at_start: int) -> float:
        """Training samples per second since `started`, validation time left out."""
        elapsed = time.perf_counter() - started - self.val_seconds
        return (self.state.samples - samples_at_start) / max(elapsed, 1e-9)

    def _run_epoch(self, bar: tqdm, started: float, samples_at_start: int) -> None:
        self.loader.set_epoch(self.state.epoch)
        if self.sampler is not None:
            # Set here, not through accelerate: its set_epoch does not reach a custom batch
            # sampler under BatchSamplerShard (several processes).
            self.sampler.set_epoch(self.state.epoch)
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
            self._end_epoch()

    def _end_epoch(self) -> None:
        """Validate the epoch's last step; count epochs without improvement, maybe stop.

        A resumed run from a checkpoint of an epoch's last step comes here too (its epoch
        has no batch left), so it validates where the uninterrupted run did.
        """
        if self.val_data is None:
            return
        self._validate()
        state, patience = self.state, self.cfg.early_stop_patience
        stop = False
        if self.is_main:
            improved, state.improved_in_epoch = state.improved_in_epoch, False
            state.epochs_without_improvement = (
                0 if improved else state.epochs_without_improvement + 1
            )
            stop = patience is not None and state.epochs_without_improvement >= patience
        # Only the main process validates: every rank stops where it says.
        state.stopped_early = bool(broadcast_object_list([stop], from_process=0)[0])
        if state.stopped_early and self.is_main:
            log.info(
                "early stop after epoch %d: no better validation for %d", state.epoch, patience
            )
            self.log.write(event="early_stop", step=state.step, epoch=state.epoch)

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
        rate = self._rate(started, samples_at_start)
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
        """Per-category metrics on the validation set at this step, once per step; a better
        `select_metric` than any before keeps a copy of the weights (main process; the
        others wait)."""
        state = self.state
        if self.val_data is None or state.validated_step == state.step:
            return None
        started = time.perf_counter()
        result = None
        if self.is_main:
            router: Router = self.accelerator.unwrap_model(self.model)
            result = validate(router, self.val_data, self.cfg.batch_size)
            metric = self.cfg.select_metric
            value = selection_value(result, metric)
            improved = value is not None and (state.best_value is None or value > state.best_value)
            # 1-based epoch of this step: an epoch's end has counted it already.
            epoch = state.epoch + (1 if state.batches_in_epoch else 0)
            if improved:
                state.best_step, state.best_epoch, state.best_value = state.step, epoch, value
                state.best_val = result
                state.improved_in_epoch = True
                self.best_weights = trainable_weights(router)
            state.last_val = result
            self.log.write(
                event="val",
                step=state.step,
                epoch=epoch,
                select_metric=metric,
                select_value=value,
                best=improved,
                **result,
            )
        state.validated_step = state.step
        self.accelerator.wait_for_everyone()
        self.val_seconds += time.perf_counter() - started
        return result

    def _select_best(self) -> None:
        """Put the best validation's weights back into the model before it is saved."""
        state = self.state
        if not self.is_main or state.best_step is None or state.best_step == state.step:
            return
        if self.best_weights is None:
            raise RuntimeError(f"the weights of the best step {state.best_step} were not kept")
        restore_weights(self.accelerator.unwrap_model(self.model), self.best_weights)
        log.info(
            "saving step %d (best %s %.4f), not the last step %d",
            state.best_step,
            self.cfg.select_metric,
            state.best_value,
            state.step,
        )

    def _save_checkpoint(self) -> Path:
        directory = self.cfg.out / "checkpoints" / f"step-{self.state.step:06d}"
        self.accelerator.save_state(str(directory))
        if self.is_main:
            state = self.state
            # The model state is this step's; an earlier best needs its own copy.
            if self.best_weights is not None and state.best_step != state.step:
                save_file(self.best_weights, str(directory / BEST_FILE))
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
        self.state = state = TrainState(**json.loads(state_file.read_text()))
        if self.is_main and state.best_step is not None:
            if state.best_step == state.step:
                self.best_weights = trainable_weights(self.accelerator.unwrap_model(self.model))
            else:
                self.best_weights = load_file(str(directory / BEST_FILE))
        log.info("resumed from %s at step %d", directory, state.step)

    def _save_final(self, samples_per_s: float, seconds: float) -> None:
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
        state = self.state
        selected = None
        if state.best_step is not None:
            selected = {
                "step": state.best_step,
                "epoch": state.best_epoch,
                "metric": self.cfg.select_metric,
                "value": state.best_value,
                "val": state.best_val,
            }
        provenance = {
            "config": _jsonable(self.cfg),
            "data_fingerprint": fingerprint([self.cfg.data]),
            "val_fingerprint": fingerprint([self.cfg.val]) if self.cfg.val else None,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "stopped_early": state.stopped_early,
            "samples_per_s": round(samples_per_s, 2),
            # Wall time of this run (of its last leg when resumed), validation included.
            "seconds": round(seconds, 1),
            "processes": self.accelerator.num_processes,
            # The saved weights: the best validation's step (null without validation: the last).
            "selected": selected,
            "final_val": self._saved_val(),  # validation figures of the saved weights
            "last_val": state.last_val,  # those of the last step
        }
        (self.cfg.out / CONFIG_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        self.log.write(
            event="end",
            steps=state.step,
            selected_step=state.best_step if state.best_step is not None else state.step,
            samples_per_s=round(samples_per_s, 2),
        )


def train(cfg: TrainConfig) -> TrainResult:
    """Train a router as `cfg` says and save it to `cfg.out`."""
    return Trainer(cfg).run()


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
