"""An on-disk cache of a frozen encoder's per-image features, shared by every process.

Why: the dual encoder's image half is frozen (LoRA goes on the text encoder only), yet without
a cache every epoch, every expert, teacher scoring, evaluation and calibration preprocesses and
re-encodes every image. Its features depend only on the pixels and on the encoder, so they can
be computed once per image and encoder and read back after that.

Keys. An entry is found by two digests, and both must match:
- the *encoder identity*: a digest the caller composes (`encoder_identity`) from everything
  the features depend on besides the pixels: the weights (`module_digest`, every state-dict
  tensor), the image size, the preprocessing (a version string and its parameters) and the
  precision the encoder runs in. A changed weight, size or preprocessing is a different
  identity, hence a different directory: a stale entry is never read, only left behind.
- the *image digest* (`image_digest`): BLAKE2b over the decoded RGB pixels (mode, size, raw
  bytes), not over the file. Posts reach the backbone as decoded PIL images (serving never has
  a path, training decodes with the same code), the features are a function of exactly these
  pixels, and the same picture saved again (another PNG compressor, EXIF stripped or edited)
  is still one entry. Hashing a decoded 1080x1920 frame (6 MB) takes a few ms on one core,
  small next to its bicubic resize and the encoder forward it saves. A decoder that decodes
  a JPEG differently (another libjpeg) gives other pixels, so a miss: the safe side.

Storage: one directory, `<root>/<identity[:32]>/<image[:2]>/<image>.safetensors`, each entry
one small safetensors file holding the float32 vector and a BLAKE2b checksum of it. Why files
rather than SQLite or LMDB: writers never lock each other (accelerate ranks, experts trained in
parallel, teach and evaluate in other processes), an entry is written to a temporary file in
its shard directory and renamed over its name (`os.replace`, atomic on POSIX), so a reader sees
a whole entry or none; and a cache on a network file system has no lock semantics to get
wrong. An entry that fails to parse, has the wrong shape or fails its checksum (a crash before
the data reached the disk, a truncated copy) counts as a miss and is written again; it never
raises. Write failures (a full disk) are warned about once and otherwise ignored: the cache
only saves time.

Size: one entry per distinct image per encoder identity, 5,264 bytes for EfficientNet-Lite0
(1280 float32 = 5,120 B plus the safetensors header); 8 KiB on a 4-KiB-block file system. The
proxy corpus' 950 images take under 8 MB; a million images about 8 GB. Nothing is evicted:
delete an identity directory (its `identity.json` says which encoder it was) or the whole root.
Serving never uses this cache (uploads are hostile and unbounded): callers opt in.
"""

import contextlib
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save
from torch import nn

FORMAT_VERSION = 1
DIGEST_BYTES = 32
IDENTITY_DIR_CHARS = 32  # 128 bits of the identity: distinct encoders never share a directory
TENSOR_NAME = "features"
CHECKSUM_KEY = "blake2b"
IDENTITY_FILE = "identity.json"
SUFFIX = ".safetensors"
_READ_ERRORS = (OSError, SafetensorError, KeyError, ValueError)


def image_digest(image: Image.Image) -> bytes:
    """32-byte BLAKE2b of the image's RGB pixels, its size and mode (see the module doc).

    Forces a lazily opened image to decode, so callers handle `OSError`/`ValueError` as
    they would from preprocessing.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"radar-pixels-v1")
    digest.update(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.digest()


def module_digest(module: nn.Module) -> str:
    """SHA-256 over every state-dict tensor of `module` (name, dtype, shape, bytes).

    Buffers count (BatchNorm running statistics are weights too in eval mode). About 40 ms
    for EfficientNet-Lite0's 3.4M parameters: computed once when a cache is enabled.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(parts: Mapping[str, object]) -> str:
    """SHA-256 hex of `parts` (JSON-able values), with this store's format version."""
    canonical = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or its directory is not one
        path.unlink()


def _checksum(features: np.ndarray) -> str:
    return hashlib.blake2b(features.tobytes(), digest_size=16).hexdigest()


@dataclass
class CacheStats:
    """Counts of this process' lookups and writes (DataLoader workers keep their own)."""

    hits: int = 0
    misses: int = 0
    bad: int = 0  # entries present but unreadable: counted in misses too, then rewritten
    writes: int = 0
    write_errors: int = 0


class FeatureCache:
    """A directory of per-image feature vectors, keyed by encoder identity and image digest.

    Picklable (a path and counters), so DataLoader workers that build inputs can read it.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.stats = CacheStats()
        self._described: set[str] = set()
        self._warned = False

    def entry_path(self, identity: str, image: bytes) -> Path:
        """Where the entry of `image` (an `image_digest`) under `identity` lives."""
        key = image.hex()
        return self.directory / identity[:IDENTITY_DIR_CHARS] / key[:2] / f"{key}{SUFFIX}"

    def get(self, identity: str, image: bytes, width: int) -> np.ndarray | None:
        """The cached `[width]` float32 vector, or None (absent, unreadable or wrong)."""
        path = self.entry_path(identity, image)
        try:
            with safe_open(str(path), framework="np") as file:
                checksum = (file.metadata() or {}).get(CHECKSUM_KEY)
                features = file.get_tensor(TENSOR_NAME)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except _READ_ERRORS:
            return self._bad()
        if (
            features.dtype != np.float32
            or features.shape != (width,)
            or checksum != _checksum(features)
        ):
            return self._bad()
        self.stats.hits += 1
        return features

    def _bad(self) -> None:
        self.stats.bad += 1
        self.stats.misses += 1
        return None

    def put(self, identity: str, image: bytes, features: np.ndarray) -> None:
        """Store one vector atomically (temporary file, then rename over the entry's name).

        Two processes writing the same entry write the same bytes; the last rename wins and
        a reader never sees a partial file. An `OSError` is warned about once, not raised.
        """
        vector = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
        data = save({TENSOR_NAME: vector}, metadata={CHECKSUM_KEY: _checksum(vector)})
        path = self.entry_path(identity, image)
        # Unique per process and thread; a leftover from a crash is a dot file, never read.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "xb") as file:
                file.write(data)
            os.replace(temporary, path)
        except OSError as exc:
            _remove(temporary)
            self.stats.write_errors += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"feature cache {self.directory}: cannot write ({exc}); going on without "
                    "storing new features",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        self.stats.writes += 1

    def describe(self, identity: str, parts: Mapping[str, object]) -> None:
        """Write `identity.json` (what the identity is made of) once, for whoever cleans up."""
        if identity in self._described:
            return
        self._described.add(identity)
        folder = self.directory / identity[:IDENTITY_DIR_CHARS]
        target = folder / IDENTITY_FILE
        if target.exists():
            return
        text = json.dumps({"identity": identity, "format": FORMAT_VERSION, **parts}, indent=2)
        temporary = folder / f".{IDENTITY_FILE}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text + "\n", encoding="utf-8")
            os.replace(temporary, target)
        except OSError:
            _remove(temporary)  # only a description: put() warns if writing matters
