"""The pipeline's steps, each with ``build_parser()`` and ``main(argv) -> int``, the grid and demo
that run them, and the tables they report (``metrics``, ``plots``)."""
