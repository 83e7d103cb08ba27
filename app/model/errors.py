"""Named errors of the model layer; the service maps them to responses at its edge."""

from pathlib import Path


class ModelError(Exception):
    """Base class of every error raised by `app.model`."""


class ModelStoreError(ModelError):
    """A model-store directory is missing a file, or a file in it is broken.

    The message always names the file and what is wrong with it.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(ModelError):
    """A post cannot be turned into model inputs (e.g. an image the backbone cannot take)."""
