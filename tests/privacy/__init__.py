"""Tests of the privacy mechanisms, accounting, ledgers and the audit."""
