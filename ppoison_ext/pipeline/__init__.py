"""The steps of the reference's pipeline, each with `build_parser()` and `main(argv) -> int`."""
