"""A tiny TCP+UDP server for traffic checks: answers every connection or datagram with
``NAME PEER_IP`` so the client learns both who answered and which source address it saw.

    python tests/harness/echo.py NAME PORT [PORT...]
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast


def _peer(ip: str) -> str:
    """The dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d."""
    return ip.removeprefix("::ffff:")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.name} {_peer(addr[0])}\n".encode(), addr)


async def _serve(name: str, ports: list[int]) -> None:
    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer.get_extra_info("peername")[0])
        writer.write(f"{name} {peer}\n".encode())
        try:
            await writer.drain()
            # Keep the connection open until the client closes it: long-lived connections
            # are how tests prove that an agent restart does not cut traffic.
            while await reader.read(4096):
                writer.write(f"{name} {peer}\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    for port in ports:
        # asyncio sets IPV6_V6ONLY on TCP listeners (so each family gets its own) but not on
        # datagram endpoints (so one dual-stack socket serves both).
        await asyncio.start_server(on_tcp, host=["0.0.0.0", "::"], port=port)
        await loop.create_datagram_endpoint(lambda: _Udp(name), local_addr=("::", port))
    await asyncio.Event().wait()


def main() -> None:
    name, *ports = sys.argv[1:]
    asyncio.run(_serve(name, [int(p) for p in ports]))


if __name__ == "__main__":
    main()
