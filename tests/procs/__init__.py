"""Helper scripts that tests/test_processes.py runs as separate OS processes."""
