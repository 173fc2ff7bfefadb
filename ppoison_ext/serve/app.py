"""The FastAPI application of ``ppoison serve`` (built by :func:`create_app` from a
:class:`ServeState`; ``ppoison_ext.serve.main`` runs it on uvicorn).

Endpoints: ``POST /v1/predict`` (wire format: :mod:`ppoison_ext.client.wire`),
``GET /v1/health`` (no key needed), ``GET /v1/info`` (model, dataset, classes, input shape,
defense name, limits — never the proxy's path or weights, nor the defense's arguments),
``GET /metrics`` (Prometheus text). Every refusal is a JSON ``{"detail": ...}`` with a 4xx
status: 401 (no or a wrong key), 413 (body or image count over the limits), 429 (budget
spent), 400/422 (malformed input, the message names the field); an unexpected failure of
the defense answers 503 and the server goes on.
"""


import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..client.wire import NPY, encode_npy
from .auth import KeyStore
from .batcher import MicroBatcher, Pending, pad_rows
from .inputs import InputError, parse_json_images, parse_npy
from .ledger import BudgetError, Ledger, LedgerEntry

__all__ = ["ServeState", "create_app", "ANONYMOUS", "BATCH_INDEPENDENT"]

logger = logging.getLogger(__name__)

#: key id of every request when the server runs without a key file
ANONYMOUS = "anonymous"
#: defenses whose rows are computed row by row (see :mod:`ppoison_ext.serve.batcher`)
BATCH_INDEPENDENT = ("none", "topk", "rounding", "reverse_sigmoid", "mad")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ENDPOINTS = ("/v1/predict", "/v1/info", "/v1/health", "/metrics")


@dataclass
class ServeState:
    """Everything a running server holds.

    Args:
        defense: the defended victim (built with ``logger=None``: the ledger logs per key).
        ledger: budgets, request records and per-key query logs.
        keys: the API keys (None: no authentication, every query is charged to ``anonymous``).
        info: the ``/v1/info`` answer.
        input_shape: C×H×W of the victim's inputs; ``image_mode`` / ``transform``: how PNGs are decoded.
        batch_independent: whether answers can be independent of the batch (reported in info).
    """

    defense: nn.Module
    ledger: Ledger
    keys: Optional[KeyStore]
    info: Dict[str, Any]
    input_shape: Sequence[int]
    image_mode: str
    transform: Callable
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_batch: int = 64
    max_wait_s: float = 0.002
    pad_multiple: int = 16
    max_request_images: int = 256
    max_body_bytes: int = 32 << 20
    torch_threads: Optional[int] = None

    def run_batch(self, batch: List[Pending]) -> List[np.ndarray]:
        """One defense call for the batch, then the ledger commit; returns each request's y′."""
        x = batch[0].x if len(batch) == 1 else torch.cat([p.x for p in batch])
        n = x.shape[0]
        pad = self.pad_multiple if self.max_batch > 1 else 1
        out = self.defense.perturb(pad_rows(x, pad).to(self.device))
        y_prime = out.y_prime[:n].detach().float().cpu()
        y = out.y[:n].detach().float().cpu()
        obj = None if out.obj is None else out.obj[:n].detach().cpu()
        sobj = None if out.sobj is None else out.sobj[:n].detach().cpu()
        entries, results, lo = [], [], 0
        for p in batch:
            hi = lo + p.n
            entries.append(LedgerEntry(p.request_id, p.key_id, y[lo:hi], y_prime[lo:hi],
                                       None if obj is None else obj[lo:hi], None if sobj is None else sobj[lo:hi],
                                       client_request_id=p.client_request_id))
            results.append(y_prime[lo:hi].numpy())
            lo = hi
        self.ledger.commit(entries)
        for p in batch:
            p.committed = True
        return results


def _error(status: int, detail: str, **extra: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail, **extra}, status_code=status)


def create_app(state: ServeState):
    """The FastAPI app serving ``state`` (see the module docs)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.requests import ClientDisconnect

    registry = CollectorRegistry()
    m_requests = Counter("ppoison_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                         registry=registry)
    m_latency = Histogram("ppoison_request_latency_seconds", "request latency by endpoint", ["endpoint"],
                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                          registry=registry)
    m_batch = Histogram("ppoison_batch_size_images", "images per defense call",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry)
    m_batch_req = Histogram("ppoison_batch_size_requests", "requests per defense call",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
    m_queries = Counter("ppoison_queries", "images answered (committed) per API key id", ["key_id"],
                        registry=registry)

    def on_batch(images: int, requests: int) -> None:
        m_batch.observe(images)
        m_batch_req.observe(requests)

    def on_drop(p: Pending) -> None:
        state.ledger.release(p.key_id, p.n)

    batcher = MicroBatcher(state.run_batch, max_batch=state.max_batch, max_wait_s=state.max_wait_s,
                           on_batch=on_batch, on_drop=on_drop)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start(state.torch_threads)
        logger.info("serving %s with defense %s", state.info.get("model"), state.info.get("defense"))
        try:
            yield
        finally:
            await batcher.stop()
            state.ledger.close()

    app = FastAPI(title="ppoison serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        endpoint = path if path in _ENDPOINTS else "other"
        try:
            response = await call_next(request)
        except Exception:  # never let one request take the server down
            logger.exception("unhandled error on %s", path)
            response = _error(500, "internal server error")
        m_requests.labels(endpoint, str(response.status_code)).inc()
        m_latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def _key_id(request: Request) -> Optional[str]:
        if state.keys is None:
            return ANONYMOUS
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        return state.keys.verify(presented)

    def _unauthorized(request: Request):
        has = request.headers.get("authorization") or request.headers.get("x-api-key")
        why = "wrong API key" if has else "missing API key (send 'Authorization: Bearer <key>' or 'X-API-Key')"
        return JSONResponse({"detail": f"authorization: {why}", "field": "authorization"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 3), "defense": state.info["defense"]}

    @app.get("/v1/info")
    async def info(request: Request):
        key_id = _key_id(request)
        if key_id is None:
            return _unauthorized(request)
        return {**state.info, "key_id": key_id, "budget_remaining": state.ledger.remaining(key_id)}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InputError(400, "content-length", f"not an integer: {declared!r}")
            if size > state.max_body_bytes:
                raise InputError(413, "body", f"{size} bytes, more than the limit of {state.max_body_bytes}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > state.max_body_bytes:
                raise InputError(413, "body", f"more than the limit of {state.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/predict")
    async def predict(request: Request):
        key_id = _key_id(request)
        if key_id is None:
            return _unauthorized(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await _read_body(request)
            if ctype == NPY:
                x = parse_npy(body, state.input_shape, state.max_request_images)
            elif ctype in ("application/json", ""):
                x = parse_json_images(body, state.image_mode, state.transform, state.input_shape,
                                      state.max_request_images)
            else:
                raise InputError(415, "content-type", f"{ctype!r}; send {NPY} or application/json")
        except InputError as err:
            return JSONResponse(err.detail(), status_code=err.status)
        except ClientDisconnect:
            return _error(400, "body: the client went away before sending all of it", field="body")
        client_id = request.headers.get("x-request-id")
        if client_id is not None and not _CLIENT_ID.match(client_id):
            return _error(422, "x-request-id: 1-128 characters of letters, digits, '_.:-'", field="x-request-id")
        try:
            state.ledger.reserve(key_id, x.shape[0])
        except BudgetError as err:
            return _error(429, str(err), field="budget")
        pending = Pending(x, key_id, uuid.uuid4().hex, client_request_id=client_id)
        try:
            y_prime = await batcher.submit(pending)
        except Exception as err:
            return _error(503, f"the defense failed on this batch ({type(err).__name__}); retry")
        n = y_prime.shape[0]
        m_queries.labels(key_id).inc(n)
        labels = y_prime.argmax(axis=1).tolist() if n else []
        headers = {"X-Request-Id": pending.request_id}
        remaining = state.ledger.remaining(key_id)
        if remaining is not None:
            headers["X-Budget-Remaining"] = str(remaining)
        if NPY in request.headers.get("accept", ""):
            headers["X-Top1"] = ",".join(map(str, labels))
            return Response(encode_npy(y_prime), media_type=NPY, headers=headers)
        return JSONResponse({"posteriors": y_prime.astype(np.float64).tolist(), "labels": labels,
                             "num_classes": int(y_prime.shape[1]), "request_id": pending.request_id},
                            headers=headers)

    app.state.serve = state
    app.state.batcher = batcher
    return app
