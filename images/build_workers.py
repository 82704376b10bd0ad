"""Build every ``workers/*/Dockerfile``, tagged as the config names it.

A worker folder ``workers/NAME`` builds the image of every configured worker
whose image repository ends in ``/NAME`` (``workerhost/NAME:latest``, say). A
folder that no worker names is built as ``workerhost/NAME:latest`` with a
warning, so that nothing in ``workers/`` rots unbuilt.

    python images/build_workers.py [-c workerhost.toml] [NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from runner import config as config_module
from runner.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def repository(image: str) -> str:
    """``registry:5000/team/name:tag`` -> ``name``."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


def tags_for(folder: str, images: list[str]) -> list[str]:
    tags = sorted({image for image in images if repository(image) == folder})
    return tags or [f"workerhost/{folder}:latest"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=None, help="config naming the images (default: workerhost.toml)")
    parser.add_argument("names", nargs="*", help="worker folders to build (default: all)")
    args = parser.parse_args()
    try:
        config = config_module.load(args.config or ROOT / "workerhost.toml")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    images = [w.image for w in config.workers]
    folders = sorted(p.parent for p in (ROOT / "workers").glob("*/Dockerfile"))
    if args.names:
        folders = [f for f in folders if f.name in args.names]
    for folder in folders:
        tags = tags_for(folder.name, images)
        if not any(repository(i) == folder.name for i in images):
            print(
                f"build-workers: no worker in {config.source} names workers/{folder.name}; tagging it {tags[0]}",
                file=sys.stderr,
            )
        command = ["docker", "build", "-q", *(arg for tag in tags for arg in ("-t", tag)), str(folder)]
        print(f"build-workers: {folder.relative_to(ROOT)} -> {', '.join(tags)}", file=sys.stderr)
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"build-workers: building {folder.name} failed:\n{done.stderr}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
