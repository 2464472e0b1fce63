"""Storage: the protocol the engine talks to, and its one SQL implementation."""
