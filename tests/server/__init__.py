"""Tests of the server: strategy, aggregation, resume, hostile replies."""
