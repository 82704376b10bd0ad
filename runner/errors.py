"""One exception root for workerhost; drivers' errors are translated at the boundary.

A task's own failure is never an exception here: the runner turns it into an
``Outcome``. Exceptions are for the host's problems: bad config, an engine
that cannot be reached, a missing image.
"""

from __future__ import annotations

from runner.protocol import EngineFault, engine_retriable


class WorkerhostError(Exception):
    """Root of every error that workerhost raises on purpose."""


class ConfigError(WorkerhostError):
    """The configuration is invalid; ``problems`` holds one readable line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class EngineError(WorkerhostError):
    """The Docker engine could not be reached, failed, or refused an operation.

    ``fault`` says which (``EngineFault``); the message says what was being
    done and what the engine answered.
    """

    def __init__(self, message: str, fault: EngineFault = EngineFault.UNREACHABLE) -> None:
        self.fault = fault
        super().__init__(message)

    @property
    def retriable(self) -> bool:
        """Whether trying again later may help; decided by the kind, in ``protocol.engine_retriable``."""
        return engine_retriable(self.fault)


class ImageMissing(EngineError):
    """A worker's image is not on the engine (``classify`` adds how to build it)."""

    def __init__(self, image: str, worker: str) -> None:
        self.image = image
        self.worker = worker
        super().__init__(f"worker {worker}: image {image} is not on the Docker engine", EngineFault.IMAGE_MISSING)
