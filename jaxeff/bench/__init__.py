"""Benchmarks: `python -m jaxeff.bench NAME [args]`. Each NAME is a module (or package: `gpu/`, one
module per section) here with `main(argv)`; `common.py` is their one harness (timing in alternating
rounds, the machine, models built through `sharding.create_sharded`, markdown tables, JSON files)."""
