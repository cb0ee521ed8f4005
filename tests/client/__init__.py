"""Tests of the client: one local round, its policy, memory, personalization."""
