"""The floor under a submit: velda's HTTP stack with nothing of velda in it.

The same uvicorn and Starlette as velda's server, on the same event loop (uvloop where it is
installed), serving one endpoint that parses a JSON body and answers 201 with a small JSON
object, the way `POST /api/v1/tasks` does. What a submit costs above this is velda's own work.

    python bench/http_floor.py PORT_FILE   # serves on 127.0.0.1, writes its port to PORT_FILE

budgets.py §3 runs it next to the submit rows, with the same submitters.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from velda.server.main import run_loop  # the server's own event loop


async def submit(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    return JSONResponse({"id": "1", "status": "QUEUED", "command": body.get("command")},
                        status_code=201)


app = Starlette(routes=[Route("/api/v1/tasks", submit, methods=["POST"])])


async def serve(port_file: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    written = port_file.with_name(port_file.name + ".tmp")
    written.write_text(str(sock.getsockname()[1]))
    written.rename(port_file)  # whole, or not there yet
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    run_loop(serve(Path(sys.argv[1])))
