"""What `test_two_processes_write_what_one_writes` runs, alone or under `accelerate launch`.

    python -m tests.training.sharded_probe OUT DATA MODEL BATCH EXPERT...

`radar teach`, `radar evaluate` and `radar calibrate` through the CLI, then `score_data`,
one after the other in one launch (a model load each, not a launch each: the test stays
short). A process other than the main one ends each command with `ShardDone` once its slice
is handed over; caught here, it goes on to the next command, as its own launch would. The
main process saves the scores to `OUT/scores.npy`.
"""

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.cli import main as radar
from app.data.sharding import ShardDone
from app.evaluation.evaluate import score_data


def until_shard_done(command: Callable[[], object]) -> None:
    try:
        status = command()
    except ShardDone:
        return
    if status not in (0, None):
        raise SystemExit(f"sharded_probe: {command} exited with {status}")


def main(argv: list[str]) -> None:
    out, data, model, batch, *experts = argv
    out_dir = Path(out)
    scoring = ["--batch-size", batch, "--no-progress"]
    until_shard_done(
        lambda: radar(["teach", "--experts", *experts, "--data", data, "--out",
                       str(out_dir / "teach.jsonl"), "--batch-size", batch])
    )  # fmt: skip
    until_shard_done(
        lambda: radar(["evaluate", "--model", model, "--data", data, "--out",
                       str(out_dir / "eval"), *scoring])
    )  # fmt: skip
    rule = ["--guarantee", "quantile"]  # taus from 10 positives (the others want more)
    until_shard_done(
        lambda: radar(["calibrate", "--model", model, "--data", data, "--recall", "0.5",
                       "--allow-few-positives", *rule, "--out", str(out_dir / "t.yaml"), *scoring])
    )  # fmt: skip
    try:
        scored = score_data(model, data, batch_size=int(batch))
    except ShardDone:
        return
    finally:
        _leave_process_group()
    np.save(out_dir / "scores.npy", scored.scores)


def _leave_process_group() -> None:
    """Tear the gloo group down before exiting: left to the interpreter's exit, a rank's
    background threads were once still joinable and the process aborted (exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
