"""`tide serve`: the model behind an OpenAI-compatible HTTP API (docs/serve.md).

The model loads once, with the usual progress, before the port opens; the decoding options are
the defaults a request's own fields override. Ctrl-C or SIGTERM stops the running generation
after its current step and exits 0. FastAPI and uvicorn come with the `serve` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tidecli.commands import options as opt

HostOpt = Annotated[str, typer.Option(
    help="Address to listen on (0.0.0.0: every interface; give --api-key then).")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on (0: any free port).")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    envvar="TIDE_API_KEY", show_envvar=False,
    help="Require `Authorization: Bearer KEY` on every request but /health. Env: TIDE_API_KEY.")]
MaxQueueOpt = Annotated[int, typer.Option(
    help="Requests that may wait while one generates; more are refused with 429.")]
ServedNameOpt = Annotated[str | None, typer.Option(
    help="The model's name in the API (/v1/models, responses). Default: --model as given.")]


@opt.with_options(opt.model_options, opt.decoding_options, opt.runtime_options)
def serve(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    max_queue: MaxQueueOpt = 16,
    served_model_name: ServedNameOpt = None,
    **options: Any,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    run_serve(opts=opt.engine_options_of(options, compile_default="auto"),
              settings=opt.decode_settings_of(options),
              host=host, port=port, api_key=api_key, max_queue=max_queue,
              name=served_model_name or default_name(options.get("model")))


def default_name(model: str | None) -> str:
    """--model as the user gave it; a folder by its name."""
    from tidecli.model.resolve import default_model

    given = model or default_model()
    path = Path(given).expanduser()
    return path.name if path.is_dir() else given


def check_options(*, port: int, api_key: str | None, max_queue: int) -> None:
    from tidecli.errors import TideError

    if not 0 <= port <= 65535:
        raise TideError(f"--port must be in 0..65535, got {port}", "e.g. --port 8000")
    if max_queue < 1:
        raise TideError(f"--max-queue must be at least 1, got {max_queue}", "e.g. --max-queue 16")
    if api_key is not None and not api_key.strip():
        raise TideError("--api-key is empty", "give a key, or leave --api-key and TIDE_API_KEY "
                                              "unset for no authentication")


def run_serve(*, opts: Any, settings: Any, host: str, port: int, api_key: str | None,
              max_queue: int, name: str) -> None:
    from tidecli.errors import TideError

    check_options(port=port, api_key=api_key, max_queue=max_queue)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TideError("tide serve needs FastAPI and uvicorn, which are not installed",
                        "pip install 'tide-dllm[serve]'") from None
    from tidecli.commands.setup import compile_ahead, open_engine
    from tidecli.serve.app import create_app
    from tidecli.serve.server import address, bind, make_server
    from tidecli.ui.console import err
    from tidecli.ui.panels import startup_panel

    settings.validate()  # out-of-range options fail before the model loads
    sock = bind(host, port)  # a port in use fails now, not after the model loaded
    try:
        engine = open_engine(opts)
        ended = True
        try:
            settings.validate(engine.cfg.max_position_embeddings)
            compile_ahead(engine, engine.decode_settings(settings))
            if err.is_terminal:
                err.print(startup_panel(engine.describe(), title="tide serve"))
            bound_host, bound_port = address(sock)
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host

            def ready() -> None:
                err.print(f"serving {name} at http://{shown}:{bound_port}/v1 "
                          "(Ctrl-C stops)", markup=False, highlight=False, soft_wrap=True)
                if api_key is None and bound_host not in ("127.0.0.1", "::1", "localhost"):
                    err.print("note: listening beyond this machine without --api-key",
                              style="yellow", markup=False, soft_wrap=True)

            app = create_app(engine, model_name=name, defaults=settings, api_key=api_key,
                             max_queue=max_queue, on_ready=ready)
            server = make_server(app)
            worker = app.state.worker
            worker.on_failure = lambda exc: setattr(server, "should_exit", True)
            server.run(sockets=[sock])
            ended = app.state.worker_ended or not server.started
            if worker.failure is not None:
                exc = worker.failure
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise TideError(f"the generation worker stopped: {type(exc).__name__}: {first}",
                                "run again with TIDE_DEBUG=1 for the traceback")
            if not server.started:
                raise TideError("the server did not start", "run again with TIDE_DEBUG=1")
            stopped = {2: "SIGINT", 15: "SIGTERM"}.get(server.stop_signal or 0, "")
            err.print(f"stopped{f' ({stopped})' if stopped else ''}", markup=False,
                      highlight=False)
        finally:
            if ended:  # a step still running keeps the runtime: the process ends anyway
                engine.close()
    finally:
        sock.close()
