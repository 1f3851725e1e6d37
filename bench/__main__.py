"""`python -m lorafleet.bench throughput ...`: the benchmarks without the main CLI."""

from .cli import main

raise SystemExit(main())
