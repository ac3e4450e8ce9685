"""Benchmarks: `python -m jaxeff.bench NAME [args]`. Each NAME is a module here with `main(argv)`."""
