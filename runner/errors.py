"""One exception root for workerhost; drivers' errors are translated at the boundary.

A task's own failure is never an exception here: the runner turns it into an
``Outcome``. Exceptions are for the host's problems: bad config, an engine
that cannot be reached, a missing image.
"""

from __future__ import annotations


class WorkerhostError(Exception):
    """Root of every error that workerhost raises on purpose."""


class ConfigError(WorkerhostError):
    """The configuration is invalid; ``problems`` holds one readable line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class EngineError(WorkerhostError):
    """The Docker engine could not be reached or refused an operation.

    ``retriable`` is true when trying again later may help (the engine was
    restarted or busy) and false when it refused the request as given.
    """

    def __init__(self, message: str, retriable: bool = True) -> None:
        self.retriable = retriable
        super().__init__(message)


class ImageMissing(EngineError):
    """A worker's image is not on the engine."""

    def __init__(self, image: str, worker: str) -> None:
        self.image = image
        self.worker = worker
        super().__init__(
            f"worker {worker}: image {image} is not on the Docker engine; build it with `make build-images`",
            retriable=False,
        )
