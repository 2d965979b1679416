"""A WASI 0.3 (p3) wasi:http service in Python (componentize-py, world wasi:http/service@0.3.0).

The p3 twin of images/guests/python/app.py: `handle` is an async export (lifted with a
callback), and waits inside it are component-model async suspensions in the host.

GET /           -> 200 "hello from python p3"
GET /loop       -> runs forever on the CPU (a deadline or fuel ends it)
GET /sleep/MS   -> awaits wasi:clocks/monotonic-clock.wait-for(MS ms), then 200: the request
                   sits suspended in an async host call (a deadline must still end it)
GET /grow/MB    -> holds MB megabytes (a memory limit ends it), then 200
GET /big/MB     -> a body of MB megabytes written in 64 KiB chunks by a task spawned after
                   `handle` returned (a client that never reads leaves it suspended in a
                   stream write until its deadline)
anything else   -> 404
"""

from typing import Optional

import componentize_py_async_support
import wit_world
from componentize_py_async_support.futures import FutureReader
from componentize_py_async_support.streams import ByteStreamWriter
from componentize_py_types import Ok, Result
from wit_world import exports
from wit_world.imports import monotonic_clock
from wit_world.imports.wasi_http_types import ErrorCode, Fields, Request, Response

CHUNK = 64 << 10


def no_trailers() -> FutureReader[Result[Optional[Fields], ErrorCode]]:
    return wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(
        lambda: Ok(None)
    )[1]


def streamed(status: int, fill) -> Response:
    """A text/plain response whose body `fill(tx)` writes after `handle` has returned."""
    tx, rx = wit_world.byte_stream()
    componentize_py_async_support.spawn(fill(tx))
    response = Response.new(Fields.from_list([("content-type", b"text/plain")]), rx, no_trailers())[0]
    response.set_status_code(status)
    return response


def text(status: int, body: str) -> Response:
    async def fill(tx: ByteStreamWriter) -> None:
        with tx:
            await tx.write_all(body.encode())

    return streamed(status, fill)


def big(size: int) -> Response:
    async def fill(tx: ByteStreamWriter) -> None:
        chunk = b"x" * CHUNK
        left = size
        with tx:
            while left > 0 and not tx.reader_dropped:
                n = min(left, CHUNK)
                await tx.write_all(chunk[:n])
                left -= n

    return streamed(200, fill)


class Handler(exports.Handler):
    async def handle(self, request: Request) -> Response:
        path = request.get_path_with_query() or "/"
        if path == "/":
            return text(200, "hello from python p3\n")
        elif path == "/loop":
            while True:
                pass
        elif path.startswith("/sleep/"):
            ms = int(path[len("/sleep/"):])
            await monotonic_clock.wait_for(ms * 1_000_000)
            return text(200, f"slept {ms} ms\n")
        elif path.startswith("/grow/"):
            held = bytearray(int(path[len("/grow/"):]) << 20)
            return text(200, f"held {len(held) >> 20} MiB\n")
        elif path.startswith("/big/"):
            return big(int(path[len("/big/"):]) << 20)
        else:
            return text(404, "not found\n")
