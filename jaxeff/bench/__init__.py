"""Benchmarks: `python -m jaxeff.bench NAME [args]`. Each NAME is a module here with `main(argv)`;
`common.py` holds what they share (timing, copy bandwidth, the SmolLM2 file)."""
