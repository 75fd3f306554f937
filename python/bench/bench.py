"""Batched publish and consume-and-ack throughput from one Python process.

    python bench/bench.py [--address HOST:PORT] [--count N] [--sizes 100,1024]

Against a running broker (start one with
``cargo run --release -p ballast-broker --bin ballastd``). For each payload
size it creates a fresh queue (sync policy ``fsync``, the default), publishes
``count`` messages through one Producer (``publish_all``, batches of
``--batch``), then consumes and acks them with one Consumer (once per
``--modes``: the consume stream, and Pull), and prints msg/s and
MiB/s for both phases, as text and (``--json``) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import ballast


async def publish_phase(
    connection: ballast.Connection, queue: str, count: int, size: int, batch: int
) -> float:
    """``Producer.publish_all`` over windows of 16 batches, two windows at once."""
    config = ballast.ProducerConfig(batch_count_max=batch, in_flight_batches_max=8)
    payload = b"x" * size
    window = 16 * batch
    windows = asyncio.Semaphore(2)
    started = time.perf_counter()
    async with ballast.Producer(connection, config) as producer:

        async def publish_window(first: int) -> None:
            async with windows:
                messages = [payload] * min(window, count - first)
                await producer.publish_all(queue, messages)

        await asyncio.gather(*(publish_window(first) for first in range(0, count, window)))
    return time.perf_counter() - started


async def consume_phase(connection: ballast.Connection, queue: str, count: int, mode: str) -> float:
    async def handler(_: ballast.Delivery) -> None:
        return None

    config = ballast.ConsumerConfig(prefetch=1000, concurrency=256, max_messages=count, mode=mode)
    started = time.perf_counter()
    await ballast.Consumer(connection, queue, handler, config).run()
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:7400")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sizes", default="100,1024")
    parser.add_argument(
        "--modes", default="stream,pull", help="consumer modes, each after its own publish run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: list[dict[str, object]] = []
    async with ballast.Connection(args.address) as connection:
        admin = ballast.Admin(connection)
        for size in (int(s) for s in args.sizes.split(",")):
            queue = f"pybench-{size}-{uuid.uuid4().hex[:8]}"
            await admin.create_queue(queue, ballast.queue_settings(dead_letter=False))
            for mode in args.modes.split(","):
                publish = await publish_phase(connection, queue, args.count, size, args.batch)
                consume = await consume_phase(connection, queue, args.count, mode)
                phases = [("publish", publish), (f"consume+ack ({mode})", consume)]
                for phase, seconds in phases:
                    rate = args.count / seconds
                    row = {"phase": phase, "size": size, "count": args.count}
                    results.append({**row, "msg_per_s": round(rate)})
                    if not args.json:
                        mib = rate * size / (1 << 20)
                        print(f"{phase:<21} {size:>5} B {rate:>10,.0f} msg/s {mib:>7.1f} MiB/s")
            await admin.delete_queue(queue)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
