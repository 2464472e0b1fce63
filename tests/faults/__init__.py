"""Fault injection: workers SIGKILLed, sqld killed and restarted, a proxy that delays, resets,
blackholes and partitions. Every test counts what it injected and asserts what survived."""
