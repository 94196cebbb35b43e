"""``fmforge serve RUN_DIR [RUN_DIR...]``: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Decoders answer /v1/completions and /v1/chat/completions through the continuous-batching engine
(``batching.py``); BERT-family and CLIP runs answer /v1/embeddings. Each run directory is served under its
directory name. SageMaker's hosting contract (GET /ping, POST /invocations), /health and Prometheus
/metrics come along. With ``--api-key-file`` every /v1 and /invocations request needs
``Authorization: Bearer KEY`` (constant-time comparison). Every refusal is OpenAI's error JSON naming the
field at fault. SIGTERM/Ctrl-C stops accepting connections and finishes the requests already running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from fmforge.deploy.batching import Engine
from fmforge.deploy.handlers import MAX_BODY_BYTES, ServeApp, ServedModel, SseStream
from fmforge.deploy.openai_api import ApiError, error_body, model_card, validation_error
from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.models.registry import family_of
from fmforge.runs import load_pretrained, read_model_config

try:  # the optional extra fmforge[serve]
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException

    from fmforge.deploy.metrics import ServeMetrics
except ImportError as _missing:  # pragma: no cover - exercised only without the extra
    _SERVE_IMPORT_ERROR: ImportError | None = _missing
else:
    _SERVE_IMPORT_ERROR = None

ENCODER_FAMILIES = ("bert", "clip")
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/invocations",
              "/ping", "/health", "/metrics")


def require_serve_extra() -> None:
    if _SERVE_IMPORT_ERROR is not None:
        raise FmforgeError(f"serving needs FastAPI, uvicorn and prometheus-client ({_SERVE_IMPORT_ERROR.name} "
                           "is missing): pip install 'fmforge[serve]'")


def load_models(run_dirs: list[str | Path], device: str = "auto", *, max_running: int = 32,
                token_budget: int = 32768, max_waiting: int = 256) -> dict[str, ServedModel]:
    """Every run directory loaded and, for decoders, an engine started; the name is the directory's name."""
    if not run_dirs:
        raise FmforgeError("give at least one run directory to serve")
    dev = pick_device(device)
    served: dict[str, ServedModel] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        name = path.resolve().name
        if name in served:
            raise FmforgeError(f"two run directories are both named {name!r}: models are served by directory name")
        family = family_of(read_model_config(path)) if path.is_dir() else "decoder"
        if family not in ("decoder", *ENCODER_FAMILIES):
            raise FmforgeError(f"{path} holds a {family} model: serve takes decoders, BERT and CLIP runs")
        model, tok = load_pretrained(path, dev, family=family)
        if family == "decoder":
            context = model.cfg.max_seq_len - getattr(model, "virtual", 0)
            engine = Engine(model, tok.eos_id, tok.vocab_size, max_running=max_running, token_budget=token_budget,
                            max_waiting=max_waiting)
            served[name] = ServedModel(name, family, model, tok, context, engine=engine, created=int(time.time()))
        else:
            context = model.cfg.text.context_length if family == "clip" else model.cfg.max_seq_len
            served[name] = ServedModel(name, family, model, tok, context, lock=threading.Lock(),
                                       created=int(time.time()))
    return served


def build_app(models: dict[str, ServedModel], *, api_keys: list[str] | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, request_timeout: float = 600.0,
              grounders: dict | None = None) -> FastAPI:
    """The FastAPI application over loaded ``models``; engines start with the app and drain when it stops.
    ``grounders``: index name -> ground(messages, k, hybrid, seed), for chat requests' ``retrieval`` field."""
    require_serve_extra()
    srv = ServeApp(models, ServeMetrics(), api_keys=api_keys, max_body_bytes=max_body_bytes,
                   request_timeout=request_timeout, grounders=grounders)

    async def lifespan(_app):
        for sm in models.values():
            if sm.engine is not None and not sm.engine.alive:
                sm.engine.start()
        yield
        # uvicorn has already stopped accepting and waited for open requests; engines finish what is left
        await asyncio.gather(*(asyncio.to_thread(sm.engine.stop, 30) for sm in models.values() if sm.engine))

    app = FastAPI(title="fmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = srv

    app.add_middleware(_Guard, srv=srv)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        return _error_response(validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail), None, "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crash(_request, err: Exception):
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", None, "server_error"),
                            status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return _reply(await srv.completions(await srv.body(request), request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return _reply(await srv.chat(await srv.body(request), request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await srv.embeddings(await srv.body(request))

    @app.get("/v1/models")
    async def models_list():
        return srv.models_list()

    @app.get("/v1/models/{name}")
    async def model_get(name: str):
        if name not in models:
            raise ApiError(404, f"model {name[:100]!r} does not exist", "model", code="model_not_found")
        return model_card(name, models[name].created)

    @app.post("/invocations")
    async def invocations(request: Request):
        return _reply(await srv.invocations(await srv.body(request), request))

    @app.get("/ping")
    async def ping():
        return {"status": "healthy"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {n: {"family": sm.family} for n, sm in models.items()}}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    return app


class _Guard:
    """API keys, the body size limit and the request counter, as plain ASGI around the app: Starlette's
    ``@app.middleware("http")`` relays every streamed chunk through an extra task and memory stream, a cost
    paid per generated token."""

    def __init__(self, app, srv: ServeApp):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, srv = scope["path"], self.srv
        status = {"code": 500, "started": False}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        headers = Headers(scope=scope)
        try:
            if (path.startswith("/v1/") or path == "/invocations") and not srv.authorized(
                    headers.get("authorization")):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                               kind="authentication_error", code="invalid_api_key")
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > srv.max_body_bytes:
                raise ApiError(413, f"request body is larger than {srv.max_body_bytes:,} bytes", "body",
                               code="body_too_large")
            await self.app(scope, receive, send_counted)
        except ApiError as err:
            await _error_response(err)(scope, receive, send_counted)
        except Exception as err:  # noqa: BLE001 - counted as a 500 like any other reply
            if not status["started"]:
                await JSONResponse(error_body(f"internal error: {type(err).__name__}", None, "server_error"),
                                   status_code=500)(scope, receive, send_counted)
        srv.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status["code"])).inc()


def _reply(result):
    if isinstance(result, SseStream):
        return StreamingResponse(result.body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.param, err.kind, err.code), status_code=err.status,
                        headers=err.headers)


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line (blank lines and ``#`` comments skipped); an empty or unreadable file is an error."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FmforgeError(f"cannot read the API key file {path}: {getattr(err, 'strerror', None) or err}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise FmforgeError(f"the API key file {path} holds no key")
    return keys


def uvicorn_server(app, host: str, port: int, graceful_timeout: float = 30.0) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_timeout, limit_concurrency=None)
    return uvicorn.Server(config)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
    """Run ``app`` under uvicorn in a background thread (tests, benchmarks); returns (server, thread) once it
    listens. ``server.should_exit = True`` then ``thread.join()`` stops it gracefully."""
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise FmforgeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread


def serve(run_dirs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key_file: str | None = None,
          device: str = "auto", max_running: int = 32, token_budget: int = 32768, max_waiting: int = 256,
          max_body_bytes: int = MAX_BODY_BYTES, request_timeout: float = 600.0, echo=print,
          grounders: dict | None = None) -> None:
    """``fmforge serve``: load the runs and answer requests until SIGTERM/Ctrl-C (graceful: requests
    already running finish). ``grounders`` as for ``build_app`` (``rag.serving.serve_command`` makes them)."""
    require_serve_extra()
    if not 0 < port < 65536:
        raise FmforgeError(f"--port must be in 1..65535 (got {port})")
    for name, value in (("--max-running", max_running), ("--token-budget", token_budget),
                        ("--max-waiting", max_waiting), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise FmforgeError(f"{name} must be at least 1 (got {value})")
    if request_timeout <= 0:
        raise FmforgeError(f"--request-timeout must be positive (got {request_timeout})")
    keys = read_api_keys(api_key_file) if api_key_file else None
    models = load_models(run_dirs, device, max_running=max_running, token_budget=token_budget,
                         max_waiting=max_waiting)
    app = build_app(models, api_keys=keys, max_body_bytes=max_body_bytes, request_timeout=request_timeout,
                    grounders=grounders)
    echo(f"serving {', '.join(f'{n} ({sm.family})' for n, sm in models.items())} on http://{host}:{port}/v1"
         + (" (API key required)" if keys else ""))
    uvicorn_server(app, host, port).run()
