"""A WASI 0.3 (p3) command in Python (componentize-py, world wasi:cli/command@0.3.0).

Exports the async `wasi:cli/run@0.3.0#run`. Writes "hello from a p3 command" to stdout through
the p3 `wasi:cli/stdout.write-via-stream` (a stream fed by this task), then exits through the
p3 `wasi:cli/exit.exit-with-code` with the code in the first argument (default 7); an argument
of "ok" returns from `run` with Ok instead, "err" with Err.
"""

import componentize_py_async_support
import wit_world
from componentize_py_async_support.streams import ByteStreamWriter
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import environment, exit, stdout


async def say(tx: ByteStreamWriter, text: bytes) -> None:
    with tx:
        await tx.write_all(text)


class Run(exports.Run):
    async def run(self) -> None:
        args = environment.get_arguments()
        arg = args[1] if len(args) > 1 else "7"
        tx, rx = wit_world.byte_stream()
        done = stdout.write_via_stream(rx)
        componentize_py_async_support.spawn(say(tx, b"hello from a p3 command\n"))
        await done.read()
        if arg == "ok":
            return
        if arg == "err":
            raise Err(None)
        exit.exit_with_code(int(arg))
