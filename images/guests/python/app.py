"""A wasi:http handler in Python (componentize-py): the big component of the serving tests.

GET /           -> 200 "hello from python"
GET /loop       -> runs forever (a deadline or fuel ends it)
GET /grow/MB    -> holds MB megabytes (a memory limit ends it), then 200
GET /big/MB     -> a body of MB megabytes (a client that never reads it leaves the handler
                   blocked in the host until its deadline)
anything else   -> 404
"""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


def respond(response_out: ResponseOutparam, status: int, text: str) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        stream.blocking_write_and_flush(text.encode())
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        if path == "/":
            respond(response_out, 200, "hello from python\n")
        elif path == "/loop":
            while True:
                pass
        elif path.startswith("/grow/"):
            held = bytearray(int(path[len("/grow/"):]) << 20)
            respond(response_out, 200, f"held {len(held) >> 20} MiB\n")
        elif path.startswith("/big/"):
            size = int(path[len("/big/"):]) << 20
            response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
            response.set_status_code(200)
            body = response.body()
            ResponseOutparam.set(response_out, Ok(response))
            chunk = b"x" * 4096
            with body.write() as stream:
                for _ in range(size // len(chunk)):
                    stream.blocking_write_and_flush(chunk)
            OutgoingBody.finish(body, None)
        else:
            respond(response_out, 404, "not found\n")
