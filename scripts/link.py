#!/usr/bin/env python3
"""A long link on loopback: a TCP relay that holds every byte for half a
round trip in each direction and caps the bytes in flight.

    scripts/link.py LISTEN_PORT TARGET_PORT --rtt MS [--window BYTES] [--rate BYTES_PER_S]

Every connection to 127.0.0.1:LISTEN_PORT is relayed to 127.0.0.1:TARGET_PORT.
Each direction is a pipe of its own: bytes read from one side are written to
the other RTT/2 after they were read, in order. At most WINDOW bytes of a
direction (default 6 MiB) are in flight at once, read but not yet
acknowledged (half a round trip after their delivery): the relay stops
reading that side until some are, so the sender's TCP stalls as a real one
does when its window is full, at most WINDOW bytes a round trip. With
--rate, a direction's bytes also leave no faster than BYTES_PER_S (a
bottleneck link with a queue of WINDOW bytes). It prints `relaying PORT`
once it listens, and runs until it is killed.

What it models: latency (each byte arrives RTT/2 later, so a reply comes a
round trip after its request), a window that bounds what a connection can
have in flight (bandwidth-delay product: at most WINDOW bytes per round
trip), and a rate. What it does not: loss, reordering, jitter, TCP's slow
start and congestion control on the long link (the two loopback legs ramp
up at once), and the handshake's SYN and FIN, which cross the relay at
once (a connect costs no round trip here; the TLS handshake that follows
pays its own).
"""

import argparse
import asyncio
import collections
import time

READ = 256 * 1024


class Direction:
    """One direction of one connection: bytes waiting for their time."""

    def __init__(self, delay, window, rate):
        self.delay, self.window, self.rate = delay, window, rate
        self.queue = collections.deque()  # (due, bytes)
        self.held = 0
        self.room = asyncio.Event()
        self.room.set()
        self.ready = asyncio.Event()
        self.closed = False
        self.next_free = 0.0  # when the rate lets the next byte leave

    async def pump_in(self, reader):
        while True:
            await self.room.wait()
            data = await reader.read(min(READ, max(1, self.window - self.held)))
            if not data:
                break
            self.queue.append((time.monotonic() + self.delay, data))
            self.held += len(data)
            if self.held >= self.window:
                self.room.clear()
            self.ready.set()
        self.closed = True
        self.ready.set()

    async def pump_out(self, writer):
        while True:
            while not self.queue:
                if self.closed:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                self.ready.clear()
                await self.ready.wait()
            due, data = self.queue.popleft()
            now = time.monotonic()
            if self.rate:
                start = max(due, self.next_free)
                self.next_free = start + len(data) / self.rate
                due = self.next_free
            if due > now:
                await asyncio.sleep(due - now)
            writer.write(data)
            await writer.drain()
            # The window opens when the acknowledgement is back, half a
            # round trip after delivery: a window's worth a round trip.
            asyncio.get_running_loop().call_at(due + self.delay, self.release, len(data))

    def release(self, n):
        self.held -= n
        if self.held < self.window:
            self.room.set()


async def relay(args, client_reader, client_writer):
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", args.target)
    except OSError:
        client_writer.close()
        return
    delay = args.rtt / 2000.0
    up = Direction(delay, args.window, args.rate)
    down = Direction(delay, args.window, args.rate)
    tasks = [
        asyncio.create_task(up.pump_in(client_reader)),
        asyncio.create_task(up.pump_out(server_writer)),
        asyncio.create_task(down.pump_in(server_reader)),
        asyncio.create_task(down.pump_out(client_writer)),
    ]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        for w in (client_writer, server_writer):
            w.close()


async def main():
    p = argparse.ArgumentParser(description="a delaying, window-capped TCP relay on loopback")
    p.add_argument("listen", type=int, help="port to listen on (0: any)")
    p.add_argument("target", type=int, help="port to relay to")
    p.add_argument("--rtt", type=float, default=100.0, help="round trip in milliseconds")
    p.add_argument("--window", type=int, default=6 << 20, help="bytes in flight per direction")
    p.add_argument("--rate", type=float, default=0.0, help="bytes per second per direction (0: no cap)")
    args = p.parse_args()
    server = await asyncio.start_server(
        lambda r, w: relay(args, r, w), "127.0.0.1", args.listen, limit=READ
    )
    port = server.sockets[0].getsockname()[1]
    print(f"relaying {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
