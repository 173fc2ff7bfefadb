"""The HTTP API of a defended model: :func:`create_app` (a FastAPI app) and :func:`create_router`
(the same endpoints for an existing app), around any :class:`~ppoison_ext.defenses.Defense`.

Endpoints: ``POST /v1/predict`` (wire format: :mod:`ppoison_ext.client.wire`),
``GET /v1/health`` (no key needed), ``GET /v1/info`` (model, dataset, classes, input shape,
defense name, limits — never the proxy's path or weights, nor the defense's arguments),
``GET /metrics`` (Prometheus text). Every refusal is a JSON ``{"detail": ...}`` with a 4xx
status: 401 (no or a wrong key), 403 (a key flagged by the detector, with ``on_detect="refuse"``),
413 (body or image count over the limits), 429 (budget spent), 400/422 (malformed input, the
message names the field); an unexpected failure of the defense answers 503 and the server goes on.

With a ``detector`` (:mod:`ppoison_ext.detectors`) every key has its own detector state, fed
with the key's committed queries (their records are committed with the ledger, so a restart
restores each key's state by replay) in a child process (:mod:`.watcher`), off the request path;
a request is judged by its key's state after all of the key's earlier committed queries (the
batch waits for the child when it is behind). A response applies from the key's next request on:
``on_detect`` "log" only flags, "refuse" answers 403 without charging the budget, a
:class:`~ppoison_ext.defenses.Defense` answers the flagged key instead of ``defense``.

A watermarked defense (:class:`~ppoison_ext.defenses.DAWN` around any other) has its marked
queries recorded per key in the ledger's commit (:mod:`.ledger`), for ``ppoison verify``.
"""

import concurrent.futures
import io
import itertools
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..checks import type_arg
from ..client.wire import NPY, encode_npy
from ..defenses import Defense, WhiteboxDefense
from ..detectors import Detector, KeyState, victim_forward
from ..devices import DeviceLike, as_device
from ..models import last_linear
from .auth import KeyStore
from .batcher import MicroBatcher, Pending, pad_rows
from .inputs import InputError, parse_json_images, parse_npy
from .ledger import BudgetError, Ledger, LedgerEntry
from .watcher import DetectorProcess

__all__ = ["create_app", "create_router", "ANONYMOUS", "IMAGE_MODES"]

logger = logging.getLogger(__name__)

#: key id of every request when the server runs without API keys
ANONYMOUS = "anonymous"
#: input channels → the PIL mode a PNG of a JSON request is converted to
IMAGE_MODES = {1: "L", 3: "RGB"}
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ENDPOINTS = ("/v1/predict", "/v1/info", "/v1/health", "/metrics")


def _error(status: int, detail: str, headers: Optional[Dict[str, str]] = None, **extra: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


class _Metrics:
    """The Prometheus metrics of one router, in a registry of their own (``registry``)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("ppoison_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=reg)
        self.latency = Histogram("ppoison_request_latency_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=reg)
        self.batch = Histogram("ppoison_batch_size_images", "images per defense call",
                               buckets=[2 ** i for i in range(11)], registry=reg)  # 1 .. 1024
        self.batch_requests = Histogram("ppoison_batch_size_requests", "requests per defense call",
                                        buckets=[2 ** i for i in range(9)], registry=reg)  # 1 .. 256
        self.queries = Counter("ppoison_queries", "images answered (committed) per API key id", ["key_id"],
                               registry=reg)
        self.flagged = Gauge("ppoison_detector_flagged_keys", "API keys the detector has flagged",
                             registry=reg)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def on_batch(self, images: int, requests: int) -> None:
        self.batch.observe(images)
        self.batch_requests.observe(requests)


def create_app(defense: Defense, *, input_shape: Sequence[int], **options: Any):
    """A FastAPI app serving ``defense`` (the keywords are :func:`create_router`'s), for uvicorn."""
    from fastapi import FastAPI

    app = FastAPI(title="ppoison serve", docs_url=None, redoc_url=None, openapi_url=None)
    router = create_router(defense, input_shape=input_shape, **options)
    app.include_router(router)
    app.add_middleware(_CountUnrouted, metrics=router.metrics)
    return app


class _CountUnrouted:
    """ASGI middleware counting the requests that reach no endpoint (404, 405); a plain ASGI
    wrapper, as starlette's ``BaseHTTPMiddleware`` costs a task group and streams per request."""

    def __init__(self, app, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_and_see)
        path = scope["path"]
        if path not in _ENDPOINTS or status == 405:
            self.metrics.observe(path if path in _ENDPOINTS else "other", status, time.perf_counter() - t0)


def create_router(defense: Defense, *, input_shape: Sequence[int], classes: Optional[Sequence[str]] = None,
                  info: Optional[Dict[str, Any]] = None, image_mode: Optional[str] = None,
                  transform: Optional[Callable] = None, api_keys: Union[str, Path, KeyStore, None] = None,
                  budget: Optional[int] = None, log_dir: Union[str, Path, None] = None, log_every: int = 1000,
                  durable: bool = False, device: DeviceLike = None, max_batch: int = 64,
                  max_wait_ms: float = 2.0, pad_multiple: int = 16, max_request_images: int = 256,
                  max_body_mb: float = 32.0, threads: Optional[int] = None,
                  detector: Optional[Detector] = None, on_detect: Union[str, Defense] = "log"):
    """The endpoints serving ``defense`` as a FastAPI ``APIRouter`` for ``app.include_router``: its
    lifespan starts the micro-batcher, and at shutdown stops it and closes the ledger.
    ``router.metrics.registry`` holds its Prometheus metrics.

    Args:
        defense: any :class:`~ppoison_ext.defenses.Defense` but a white-box variant (its online
            attacker would train on the query stream), built with ``logger=None`` (the ledger
            logs per key). With ``max_batch > 1`` it is called on batches of several requests;
            answers do not depend on the batch when ``defense.batch_independent``.
        input_shape: the shape of one input (C×H×W for images), as npy requests send it.
        classes: class names (default ``"0"``..``"K-1"``, K from one forward of zeros).
        info: more (or other) ``/v1/info`` fields.
        image_mode, transform: how a PNG of a JSON request becomes an input (default: the PIL mode
            of ``IMAGE_MODES`` by channel count, then torchvision's ``to_tensor``); without a
            mode only npy requests are taken.
        api_keys: a key file (:mod:`.auth`) or a ``KeyStore``; None: every query is charged to
            ``anonymous``. ``budget``: queries per key (None: unlimited; a key file's budget
            column overrides it).
        log_dir: folder of ``ledger.sqlite`` and the per-key query logs (:mod:`.ledger`); None
            keeps budgets and request records in memory and writes no query log.
        log_every, durable: the query logs' distance-row period; fsync every commit.
        max_batch, max_wait_ms, pad_multiple, threads: micro-batching (:mod:`.batcher`).
        max_request_images, max_body_mb: per-request limits (413).
        detector, on_detect: per-key extraction detection and the response to a flagged key
            (module docs); the detector's state is persisted only with a ``log_dir``.
    """
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, Response
    from fastapi.routing import APIRoute
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.requests import ClientDisconnect

    type_arg(defense, "defense", Defense, "a ppoison_ext Defense")
    for name, d in (("defense", defense), ("on_detect", on_detect)):
        if isinstance(d, WhiteboxDefense):
            raise ValueError(f"{name}: the white-box variants are not served (their online attacker is "
                             "trained on the query stream)")
    type_arg(detector, "detector", Detector, "a ppoison_ext Detector", optional=True)
    if not (isinstance(on_detect, Defense) or on_detect in ("log", "refuse")):
        raise ValueError(f"on_detect must be 'log', 'refuse' or a Defense, got {on_detect!r}")
    for name, value, low in (("max_batch", max_batch, 1), ("pad_multiple", pad_multiple, 1),
                             ("max_request_images", max_request_images, 1), ("log_every", log_every, 1),
                             ("max_wait_ms", max_wait_ms, 0), ("budget", budget, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    input_shape = tuple(int(v) for v in input_shape)
    device = next(defense.parameters(), torch.empty(0)).device if device is None else as_device(device)
    if classes is None:
        classes = range(defense.victim_probs(torch.zeros(1, *input_shape, device=device)).shape[1])
    image_mode = image_mode or IMAGE_MODES.get(input_shape[0])
    if transform is None and image_mode is not None:
        from torchvision.transforms.functional import to_tensor as transform
    accepted = f"{NPY} or application/json" if image_mode else NPY
    keys = KeyStore.load(api_keys) if isinstance(api_keys, (str, Path)) else api_keys
    ledger = Ledger(log_dir, keys.budgets(budget) if keys is not None else {ANONYMOUS: budget},
                    log_every=log_every, durable=durable, record_width=detector and detector.record_width,
                    record_tag=detector.name if detector else "")
    info = {"model": type(defense.model).__name__, "dataset": None, "num_classes": len(classes),
            "classes": [str(c) for c in classes], "input_shape": list(input_shape), "input_dtype": "float32",
            "defense": type(defense).__name__, "batch_independent": bool(defense.batch_independent),
            "max_batch": max_batch, "max_request_images": max_request_images,
            "detector": detector.name if detector else None,
            "on_detect": type(on_detect).__name__ if isinstance(on_detect, Defense) else on_detect,
            **(info or {})}
    max_body_bytes = int(max_body_mb * (1 << 20))
    # a stateful defense's state is committed with each batch and restored here (module docs)
    stateful = [d for d in (defense, on_detect) if isinstance(d, Defense) and d.stateful]

    def set_states(blob: bytes) -> None:
        for d, st in zip(stateful, torch.load(io.BytesIO(blob), weights_only=True)):
            d.set_state(st)

    def get_states() -> bytes:
        buf = io.BytesIO()
        torch.save([d.get_state() for d in stateful], buf)
        return buf.getvalue()

    committed_state = ledger.defense_state() if stateful else None
    if committed_state is not None:
        set_states(committed_state)
    elif stateful:
        committed_state = get_states()
    pad = pad_multiple if max_batch > 1 else 1
    metrics = _Metrics()

    head = last_linear(defense.model) if detector is not None else None
    captured = threading.local()  # the victim head's input during our own defense calls
    hook = head.register_forward_hook(
        lambda _m, inp, _o: setattr(captured, "h", inp[0]) if getattr(captured, "on", False) else None
    ) if head is not None else None

    watcher = None if detector is None else DetectorProcess(detector)

    def state_of(key_id: str) -> KeyState:
        """The key's detector summary after all of its committed queries (the batch thread's)."""
        if not watcher.known(key_id):  # restored by replaying the key's committed records
            watcher.observe(key_id, ledger.read_records(key_id))
        return watcher.summary(key_id)

    if watcher is not None:
        ledger.save_detections({key_id: state_of(key_id) for key_id in ledger.key_ids()})
        metrics.flagged.set(watcher.flagged())

    def answer(d: Defense, x: torch.Tensor) -> list:
        """d's y′, y, obj, sobj, watermark marks of x's rows (padded for batch independence) and,
        with a detector, the victim's penultimate features of those rows."""
        n = x.shape[0]
        captured.on, captured.h = True, None
        try:
            out = d.perturb(pad_rows(x, pad).to(device))
        finally:
            captured.on = False
        h = getattr(captured, "h", None)
        if head is not None and (h is None or h.shape[0] < n):  # the defense never ran the victim on x
            h = victim_forward(defense.model, x.to(device), head)[1]
        return [None if t is None else t[:n].detach().cpu() for t in (*out, h)]

    # SEAT's records (its encoder forward) beside the victim's forward: one torch thread
    recorder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ppoison-records",
                                                     initializer=torch.set_num_threads, initargs=(1,))

    def summaries_of(batch: List[Pending]) -> List[KeyState]:
        """Each request's key summary after all of the key's earlier committed queries."""
        if watcher is None:
            return [KeyState() for _ in batch]
        summaries = [state_of(p.key_id) for p in batch]
        metrics.flagged.set(watcher.flagged())
        return summaries

    def fill(rows: List[Any], d: Defense, batch: List[Pending], which: List[int]) -> None:
        """rows[i] = d's y′, y, obj, sobj, marks and features of request i's images, for i in ``which``."""
        if which:
            cols = answer(d, torch.cat([batch[i].x for i in which]))
            for i, lo in zip(which, np.cumsum([0] + [batch[i].n for i in which]).tolist()):
                rows[i] = [None if t is None else t[lo:lo + batch[i].n] for t in cols]

    def run_batch(batch: List[Pending]) -> List[Any]:
        try:
            return answer_and_commit(batch)
        except BaseException:
            if stateful:  # answered but not committed: back to the committed state
                set_states(committed_state)
            raise

    def answer_and_commit(batch: List[Pending]) -> List[Any]:
        """``defense``'s answers, ``on_detect``'s for the flagged keys, the ledger commit, then the
        detector's observation of the committed records in its process, off the request path (a
        stateless defense answers while the process finishes the keys' earlier queries). Returns
        each request's y′, or the KeyState of a refused request."""
        nonlocal committed_state
        ahead = None  # records that need only the inputs (SEAT's encoder) run beside the victim's forward
        if detector is not None and detector.inputs_only:
            ahead = recorder.submit(lambda: [detector.records(p.x, None, None) for p in batch])
        acts = on_detect != "log"
        early = defense.stateful  # a stateful defense never sees a flagged key's queries
        summaries = summaries_of(batch) if early else None
        held_back = {i for i, s in enumerate(summaries or ()) if s.flag and acts}
        rows: List[Any] = [None] * len(batch)
        fill(rows, defense, batch, [i for i in range(len(batch)) if i not in held_back])
        if summaries is None:
            summaries = summaries_of(batch)
        respond = [i for i, s in enumerate(summaries) if s.flag and acts]
        if isinstance(on_detect, Defense):
            fill(rows, on_detect, batch, respond)
        for i in respond if on_detect == "refuse" else ():
            rows[i] = summaries[i]
            ledger.release(batch[i].key_id, batch[i].n)
        inputs_records = ahead.result() if ahead is not None else None
        entries = []
        for i, (p, row) in enumerate(zip(batch, rows)):
            if isinstance(row, list):
                y_prime, y, obj, sobj, marks, h = row
                records = (inputs_records[i] if inputs_records is not None
                           else detector.records(p.x, y, h) if detector is not None else None)
                entries.append(LedgerEntry(p.request_id, p.key_id, y.float(), y_prime.float(), obj, sobj,
                                           client_request_id=p.client_request_id, records=records,
                                           x=p.x, marks=marks))
        state = get_states() if stateful else None
        detections = {p.key_id: s for p, s in zip(batch, summaries)} if watcher is not None else None
        ledger.commit(entries, detections, state)
        committed_state = state if stateful else None
        for p in batch:
            p.committed = True
        for e in entries if watcher is not None else ():
            watcher.observe(e.key_id, e.records)
        answers = iter(entries)
        return [row if isinstance(row, KeyState) else next(answers).y_prime.numpy() for row in rows]

    batcher = MicroBatcher(run_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                           on_batch=metrics.on_batch, on_drop=lambda p: ledger.release(p.key_id, p.n))
    started = time.time()
    # 32 hex digits like a uuid4's: a random prefix per process and a counter (no urandom per request)
    id_prefix = os.urandom(8).hex()
    request_ids = (f"{id_prefix}{i:016x}" for i in itertools.count())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start(threads or torch.get_num_threads())
        logger.info("serving %s with defense %s", info["model"], info["defense"])
        try:
            yield
        finally:
            await batcher.stop()
            recorder.shutdown(wait=True)
            if watcher is not None:
                watcher.close()
                ledger.save_detections(watcher.summaries())
            ledger.close()
            if hook is not None:
                hook.remove()

    class ObservedRoute(APIRoute):
        """Counts and times each request; an unexpected error answers 500 and the server goes on."""

        def get_route_handler(self):
            handler, endpoint = super().get_route_handler(), self.path

            async def observed(request: Request):
                t0 = time.perf_counter()
                try:
                    response = await handler(request)
                except Exception:
                    logger.exception("unhandled error on %s", request.url.path)
                    response = _error(500, "internal server error")
                metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
                return response

            return observed

    router = APIRouter(route_class=ObservedRoute, lifespan=lifespan)
    router.metrics = metrics

    def key_id_of(request: Request) -> Optional[str]:
        if keys is None:
            return ANONYMOUS
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        return keys.verify(presented)

    def unauthorized(request: Request):
        has = request.headers.get("authorization") or request.headers.get("x-api-key")
        why = "wrong API key" if has else "missing API key (send 'Authorization: Bearer <key>' or 'X-API-Key')"
        return _error(401, f"authorization: {why}", {"WWW-Authenticate": "Bearer"}, field="authorization")

    @router.get("/v1/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 3), "defense": info["defense"]}

    @router.get("/v1/info")
    async def get_info(request: Request):
        key_id = key_id_of(request)
        if key_id is None:
            return unauthorized(request)
        return {**info, "key_id": key_id, "budget_remaining": ledger.remaining(key_id)}

    @router.get("/metrics")
    async def get_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InputError(400, "content-length", f"not an integer: {declared!r}")
            if size > max_body_bytes:
                raise InputError(413, "body", f"{size} bytes, more than the limit of {max_body_bytes}")
        chunks, total, more = [], 0, True
        while more:  # the ASGI messages themselves: an async generator per request costs more
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            total += len(chunk)
            if total > max_body_bytes:
                raise InputError(413, "body", f"more than the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @router.post("/v1/predict")
    async def predict(request: Request):
        key_id = key_id_of(request)
        if key_id is None:
            return unauthorized(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await read_body(request)
            if ctype == NPY:
                x = parse_npy(body, input_shape, max_request_images)
            elif ctype in ("application/json", "") and image_mode is not None:
                x = parse_json_images(body, image_mode, transform, input_shape, max_request_images)
            else:
                raise InputError(415, "content-type", f"{ctype!r}; send {accepted}")
        except InputError as err:
            return JSONResponse(err.detail(), status_code=err.status)
        except ClientDisconnect:
            return _error(400, "body: the client went away before sending all of it", field="body")
        client_id = request.headers.get("x-request-id")
        if client_id is not None and not _CLIENT_ID.match(client_id):
            return _error(422, "x-request-id: 1-128 characters of letters, digits, '_.:-'", field="x-request-id")
        try:
            ledger.reserve(key_id, x.shape[0])
        except BudgetError as err:
            return _error(429, str(err), field="budget")
        pending = Pending(x, key_id, next(request_ids), client_request_id=client_id)
        try:
            y_prime = await batcher.submit(pending)
        except Exception as err:
            return _error(503, f"the defense failed on this batch ({type(err).__name__}); retry")
        if isinstance(y_prime, KeyState):
            return _error(403, f"detector: key {key_id!r} was flagged by {detector.name} at its query "
                               f"{y_prime.flagged_at}; its queries are refused", field="detector")
        n = y_prime.shape[0]
        metrics.queries.labels(key_id).inc(n)
        labels = y_prime.argmax(axis=1).tolist() if n else []
        headers = {"X-Request-Id": pending.request_id}
        remaining = ledger.remaining(key_id)
        if remaining is not None:
            headers["X-Budget-Remaining"] = str(remaining)
        if NPY in request.headers.get("accept", ""):
            headers["X-Top1"] = ",".join(map(str, labels))
            return Response(encode_npy(y_prime), media_type=NPY, headers=headers)
        return JSONResponse({"posteriors": y_prime.astype(np.float64).tolist(), "labels": labels,
                             "num_classes": int(y_prime.shape[1]), "request_id": pending.request_id},
                            headers=headers)

    return router
