"""Consumes 10 messages of `emails`: a handler that returns acks, one that raises nacks.

python examples/consume.py [ADDRESS]   # default 127.0.0.1:7400
"""

from __future__ import annotations

import asyncio
import sys

import ballast


async def handle(delivery: ballast.Delivery) -> None:
    print(delivery.id, delivery.payload.decode(errors="replace"), f"attempt {delivery.attempt}")


async def main(address: str) -> None:
    async with ballast.Connection(address) as connection:
        config = ballast.ConsumerConfig(prefetch=16, concurrency=4, max_messages=10)
        consumer = ballast.Consumer(connection, "emails", handle, config)
        await consumer.run()  # consumer.stop() from elsewhere stops it gracefully
        print(f"acked {consumer.acked}, nacked {consumer.nacked}")
        figures = await ballast.Stats(connection).queue("emails")
        print(f"{figures.saturation.depth} messages left")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7400"))
