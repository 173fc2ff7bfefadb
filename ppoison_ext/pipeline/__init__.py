"""The steps of the original pipeline, each with `build_parser()` and `main(argv) -> int`."""
