"""durably's benchmarks: ``nox -s bench`` (or ``python -m benchmarks``) prints the table."""
