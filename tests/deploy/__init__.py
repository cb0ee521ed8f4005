"""Tests of deployment: start-up checks, the worker, SuperLink and SuperNodes."""
