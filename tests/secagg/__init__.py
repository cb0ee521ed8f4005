"""Tests of SecAgg+, honest and against a lying server."""
