"""``python -m runner`` is ``workerhost``."""

from __future__ import annotations

import gc


def main() -> int:
    """``workerhost``, with its imports made while the collector rests.

    Importing makes a few hundred thousand objects and next to no garbage, so
    the collections that they trigger find nothing (some 8% of the imports'
    time). ``runner.cli.main`` then freezes what the imports made. The
    ``workerhost`` script can come in here too: ``runner.__main__:main``.
    """
    gc.disable()
    try:
        from runner.cli import main as cli_main
    finally:
        gc.enable()
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
