"""An asyncio event loop on a thread of its own, for callers that are not async themselves: the
shard's grpc.aio server runs on one (servicer.serve), started and stopped from the shard actor's
ordinary threads."""
from __future__ import annotations

import asyncio
import threading


class EventLoop:
    """An asyncio loop on a thread of its own: where the aio gRPC server runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="shard-grpc", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        """The coroutine's result, run on the loop; blocks the calling thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
