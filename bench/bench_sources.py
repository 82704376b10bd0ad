"""Task sources compared in the same run: the embedded queue (SQLite), Redis and RabbitMQ.

1. Per-task overhead of the source alone: claim + report round trips, in process, no containers
   (RabbitMQ's report publishes the result and acks).
2. Throughput through ``workerhost serve`` with real containers (trivial tasks, concurrency 4 per
   host): the embedded queue with one host, Redis with 1, 2 and 3 hosts. On one machine every host
   shares one engine, so more hosts do not mean more throughput: the engine is the bottleneck.
   Target: Redis with one host at least 0.9x the embedded queue.

Redis and RabbitMQ run in containers built from images/services/* (as the tests start them), removed
at the end. RabbitMQ keeps no task records, so its throughput through serve is not measured here.

    python bench/bench_sources.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.config import AmqpSource, WorkerConfig  # noqa: E402
from runner.protocol import Outcome, Status  # noqa: E402
from runner.sources import Finished  # noqa: E402
from runner.sources.amqp import AmqpTaskSource  # noqa: E402
from runner.sources.embedded import EmbeddedQueue  # noqa: E402
from runner.sources.redis import RedisQueue  # noqa: E402
from tests.conftest import BEHAVE_IMAGE, build_test_image  # noqa: E402
from tests.integration.test_redis_source import redis_config  # noqa: E402
from tests.services import RABBITMQ_IMAGE, REDIS_IMAGE, build_service, service  # noqa: E402
from tests.serving import Serve, config_text, free_port  # noqa: E402

TYPE = "Test.Behave"
DONE = Finished(Outcome(Status.COMPLETED, result={}), worker="bench")


async def overhead(queue: EmbeddedQueue | RedisQueue, count: int) -> float:
    """Milliseconds per task for claim + complete, tasks already queued."""
    for i in range(count):
        queue.submit(TYPE, {"n": i}, max_attempts=1)
    began = time.perf_counter()
    for _ in range(count):
        task = await queue.claim([TYPE])
        assert task is not None
        await queue.complete(task, DONE)
    elapsed = time.perf_counter() - began
    await queue.close()
    return elapsed / count * 1000


async def amqp_overhead(url: str, count: int) -> float:
    """Milliseconds per task for claim + complete on RabbitMQ, messages already published."""
    import aio_pika

    deadline = time.monotonic() + 90  # the port answers a few seconds before AMQP does
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
    channel = await connection.channel()
    await channel.declare_queue(TYPE, durable=True)
    for i in range(count):
        body = f'{{"type": "{TYPE}", "params": {{"n": {i}}}}}'.encode()
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, TYPE)
    await connection.close()
    worker = WorkerConfig(name=TYPE, image="bench", task_types=[TYPE], max_retries=0)
    source = AmqpTaskSource(AmqpSource.model_validate({"type": "amqp", "url": url}), [worker])
    await source.start()
    began = time.perf_counter()
    for _ in range(count):
        task = await source.claim([TYPE])
        assert task is not None
        await source.complete(task, DONE)
    elapsed = time.perf_counter() - began
    await source.close()
    return elapsed / count * 1000


def throughput(tmp: Path, configs: list[str], total: int) -> float:
    """Tasks per second from the first submit to the last completion, across these hosts."""
    hosts = []
    try:
        for n, text in enumerate(configs):
            path = tmp / f"bench-{n}-{time.monotonic_ns()}.toml"
            path.write_text(text)
            port = int(text.split('http = "127.0.0.1:')[1].split('"')[0])
            hosts.append(Serve(path, port, tmp / f"{path.stem}.log").start())
        began = time.perf_counter()
        ids = [hosts[i % len(hosts)].submit(TYPE, do="ok")["id"] for i in range(total)]
        for task_id in ids:
            hosts[0].wait_for(task_id, ("completed",), timeout=600)
        return total / (time.perf_counter() - began)
    finally:
        for host in hosts:
            host.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tasks")
    args = parser.parse_args()
    per_source, total = (300, 60) if args.quick else (2000, 200)
    image = build_test_image(BEHAVE_IMAGE, "behave")
    redis_image = build_service(REDIS_IMAGE, "redis")
    with tempfile.TemporaryDirectory() as folder, service(redis_image, 6379, {}, host_port=free_port()) as broker:
        tmp = Path(folder)
        host, port = broker.address
        url = f"redis://{host}:{port}/0"
        embedded_ms = asyncio.run(overhead(EmbeddedQueue(tmp / "overhead.db", owner="bench:1:a"), per_source))
        redis_ms = asyncio.run(overhead(RedisQueue(url, owner="bench:1:a", prefix="overhead"), per_source))
        with service(build_service(RABBITMQ_IMAGE, "rabbitmq"), 5672, {}, timeout=90) as rabbit:
            amqp_url = "amqp://guest:guest@{}:{}/".format(*rabbit.address)
            amqp_ms = asyncio.run(amqp_overhead(amqp_url, per_source))
        print(f"per-task overhead (claim + report, {per_source} tasks, in process):")
        print(f"  embedded {embedded_ms:6.2f} ms   redis {redis_ms:6.2f} ms   amqp {amqp_ms:6.2f} ms")

        def embedded(n: int) -> str:
            return config_text(f"bench-e{n}", free_port(), tmp / "serve.db", image)

        def shared(n: int, prefix: str) -> str:
            text = redis_config(f"bench-r{n}", free_port(), url, image)
            return text.replace('type = "redis"', f'type = "redis"\nprefix = "{prefix}"')

        print(f"throughput through serve, {total} trivial tasks, concurrency 4 per host (one engine for all):")
        base = throughput(tmp, [embedded(0)], total)
        print(f"  {'embedded, 1 host':<18} {base:6.1f} tasks/s")
        ratio = None
        for count in (1, 2, 3):
            rate = throughput(tmp, [shared(n, f"hosts{count}") for n in range(count)], total)
            ratio = ratio if ratio is not None else rate / base
            label = f"redis, {count} host{'s' if count > 1 else ''}"
            print(f"  {label:<18} {rate:6.1f} tasks/s  ({rate / base:.2f}x embedded)")
        assert ratio is not None
        verdict = "meets" if ratio >= 0.9 else "MISSES"
        print(f"  redis with one host {ratio:.2f}x embedded ({verdict} the 0.9x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
