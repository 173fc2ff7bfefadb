"""A defended model over HTTP (FastAPI on uvicorn): :func:`create_app` serves any
:class:`~ppoison_ext.defenses.Defense`, :func:`create_router` mounts the same endpoints into an
existing FastAPI app, ``ppoison serve`` (:mod:`.main`) serves a model folder with them.

Modules: :mod:`.app` (endpoints, metrics), :mod:`.batcher` (micro-batching), :mod:`.ledger`
(budgets, query logs, the commit order), :mod:`.auth` (hashed API keys), :mod:`.inputs` (request
decoding, its 4xx answers). Needs the ``serve`` extra (``pip install 'ppoison_ext[serve]'``).
"""

__all__ = ["create_app", "create_router"]


def __getattr__(name: str):
    if name in __all__:  # loaded on first use: ``ppoison serve-keygen`` needs no torch
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
