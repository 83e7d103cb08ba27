"""Serve the router with LitServe: a baseline for the serving benchmark, not the product.

The benchmark asks what our serving layer (FastAPI, admission, `DynamicBatcher`) buys over a
stock one: the same model wrapped in a LitServe `LitAPI`, with the same batch size and wait,
under the same load. Only the serving layer differs; the rest is our code: `load_router`,
`load_thresholds`, `RouterEngine.route` (the per-batch function our batcher calls), `PostIn`
and `ImageLoader` with the service's limits, and the step after the model that `/route`
runs (`PostOutcomes.answered`: metrics, audit draw, the `RouteResult`; no decision log, as
the benchmark's service runs without one).

`POST /predict` takes a `/route` body and answers like `/route`; `GET /health` is 200 once the
worker is set up. LitServe runs one HTTP process and one inference worker (spawned), linked by
a multiprocessing manager's queues; SIGTERM stops all of them.
"""

import argparse
import multiprocessing as mp
import os
import signal
from pathlib import Path
from types import FrameType

import litserve as ls
import torch
from fastapi import HTTPException
from transformers.utils import logging as transformers_logging

from app.model.post import Post
from app.model.store import load_router
from app.service.audit import AuditSampler
from app.service.engine import Decision, RouterEngine
from app.service.errors import BadPostError
from app.service.images import ImageLoader
from app.service.metrics import ServiceMetrics
from app.service.outcomes import PostOutcomes
from app.service.schemas import PostIn, RouteResult
from app.service.settings import Settings
from app.thresholds import ActiveThresholds, load_thresholds


class RouterAPI(ls.LitAPI):
    """Our router behind LitServe; `setup` runs in the inference worker process."""

    def __init__(
        self, model_dir: Path, thresholds: Path, torch_threads: int, **kw: float | int
    ) -> None:
        super().__init__(**kw)  # max_batch_size, batch_timeout
        self.model_dir = model_dir
        self.thresholds_path = thresholds
        self.torch_threads = torch_threads

    def setup(self, device: str) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        # As the service does; tqdm's bar would also leave a semaphore in this process, which
        # LitServe ends with SIGTERM (a "leaked semaphore" warning at exit).
        transformers_logging.disable_progress_bar()
        router = load_router(self.model_dir, device)
        self.model_version = router.config.model_version
        self.thresholds: ActiveThresholds = load_thresholds(
            self.thresholds_path, router.categories, self.model_version
        )
        self.engine = RouterEngine(router)
        self.engine.warm_up()
        self.settings = Settings()
        self.images = ImageLoader(self.settings)
        s = self.settings
        audit = AuditSampler(s.audit_rate, s.audit_rates, router.categories)
        self.outcomes = PostOutcomes(router.categories, self.model_version, ServiceMetrics(), audit)

    # The annotation makes LitServe's FastAPI endpoint validate the body as `PostIn` in the
    # HTTP process, as `/route` does: a bad body is a 422 there and never reaches a batch.
    def decode_request(self, request: PostIn) -> tuple[str, Post]:
        # Runs in the worker, per post, before the batch's forward. An error here fails the
        # whole batch in LitServe (one try around decode + predict); the benchmark's posts
        # are all valid. The checks are `app.service.intake.to_model_post`'s, minus URLs.
        s, pid = self.settings, request.post_id
        try:
            for name in ("title", "ocr_text"):
                if len(getattr(request, name)) > s.max_text_chars:
                    raise BadPostError(pid, name, f"longer than {s.max_text_chars} chars")
            if len(request.images) > s.max_images_per_post:
                raise BadPostError(pid, "images", f"at most {s.max_images_per_post} images")
            images = []
            for i, image in enumerate(request.images):
                if image.data is None:
                    raise BadPostError(pid, f"images[{i}]", "URL images are not supported here")
                images.append(self.images.decode_base64(pid, f"images[{i}].data", image.data))
        except BadPostError as exc:
            raise HTTPException(422, str(exc)) from None
        return pid, Post(request.title, request.ocr_text, tuple(images))

    def predict(self, x: list[tuple[str, Post]]) -> list[tuple[str, Decision]]:
        ids, posts = zip(*x, strict=True)
        with torch.inference_mode():
            decisions = self.engine.route(posts, self.thresholds)
        return list(zip(ids, decisions, strict=True))

    def encode_response(self, output: tuple[str, Decision]) -> RouteResult:
        post_id, decision = output
        (result,), _ = self.outcomes.answered([post_id], [decision])
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-dir", type=Path, default=Path("model_store/proxy"), help="model store")
    p.add_argument(
        "--thresholds", type=Path, default=Path("thresholds/proxy.yaml"), help="thresholds YAML"
    )
    p.add_argument("--port", type=int, default=8123, help="port on 127.0.0.1 (1024-65535)")
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="posts per forward (RADAR_MAX_BATCH_SIZE)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="batch gather wait (RADAR_MAX_WAIT_MS)"
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=2.0,
        help="LitServe's request timeout: a request queued longer is a 504 (default: "
        "RADAR_DEADLINE_MS; LitServe checks it only when a batch is gathered)",
    )
    p.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads; 0 keeps the default"
    )
    p.add_argument(
        "--fast-queue",
        action="store_true",
        help="LitServe's ZeroMQ request queues instead of multiprocessing Manager queues "
        "(its own advice above ~100 requests/s)",
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"])
    return p.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # LitServe shuts its processes down on KeyboardInterrupt only; SIGTERM would kill this
    # process alone and leave the manager, the worker and the HTTP server running.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    api = RouterAPI(
        args.model_dir.resolve(),
        args.thresholds.resolve(),
        args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.max_wait_ms / 1000,
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=1,
        timeout=args.timeout_s,
        fast_queue=args.fast_queue,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    # Forked children (the manager, the HTTP server) must not inherit it: uvicorn re-raises
    # the SIGTERM it caught once it has drained, and would die with a KeyboardInterrupt.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        server.run(
            host="127.0.0.1",
            port=args.port,
            num_api_servers=1,
            log_level=args.log_level,
            generate_client_file=False,  # else it writes client.py into the working directory
        )
    except KeyboardInterrupt:
        pass  # before the server was up (LitServe only handles it once serving)
    finally:
        for child in mp.active_children():  # anything LitServe left, e.g. a failed start
            child.terminate()
            child.join(5)
            if child.is_alive():
                child.kill()


if __name__ == "__main__":
    main()
