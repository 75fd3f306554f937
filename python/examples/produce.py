"""Publishes 20 messages to the low lane of `emails`, easing off as the queue fills.

python examples/produce.py [ADDRESS]   # default 127.0.0.1:7400
"""

from __future__ import annotations

import asyncio
import sys

import ballast


async def main(address: str) -> None:
    async with ballast.Connection(address) as connection:
        # Succeeds if the queue exists with the same settings.
        await ballast.Admin(connection).create_queue(
            "emails", ballast.queue_settings(max_messages=100)
        )
        # Publishes are batched, retried within a deadline (never sooner than
        # the broker's retry-after hint) and stored once thanks to keys.
        async with ballast.Producer(connection) as producer:
            for n in range(20):
                try:
                    receipt = await producer.publish(
                        "emails", ballast.Message(f"digest {n}".encode(), lane=2)
                    )
                except ballast.Refused as error:
                    print(f"still refused after retrying: {error}; try in {error.retry_after}s")
                    break
                queue = receipt.queue
                print(f"stored at {receipt.id}; the queue is {queue.saturation:.0%} full")
                if queue.saturation > 0.5:  # low is refused above 70%: ease off
                    await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7400"))
