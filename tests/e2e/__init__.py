"""End-to-end runs: the simulation engine, parity with deployment, interrupted runs."""
