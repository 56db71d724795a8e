"""Helpers the tests share: real servers and processes, raw HTTP and WebSocket peers.

Fixtures stay in ``tests/conftest.py``; what a test imports lives here.
"""
