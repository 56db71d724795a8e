"""The ingest path's fast paths past a library's public API, kept together in one place.

Each exists for a measured reason (BENCHMARKS.md) and each has a test that trips when the
private parts it relies on change; the exact aiohttp release they were written against is
pinned by the lock (``tests/deploy/test_lock.py``).

``acks``: the 202 written to the connection in one piece. Private parts of aiohttp's
``web.StreamResponse``: ``_eof_sent``, ``_keep_alive`` and ``_headers``.
Tripwire: ``tests/service/test_ingest_http.py``.

``wsframes``: WebSocket text messages taken from the frame parser, replies written as frames.
Private parts: ``aiohttp._websocket.reader.WebSocketDataQueue`` and ``WebSocketReader``; on
``web.WebSocketResponse``: ``_post_start``, ``_reader``, ``_parser``, ``_max_msg_size``,
``_compress``, ``_loop``; on the old queue: ``_size``; on the request protocol:
``_payload_parser``, ``_message_tail``; on the writer: ``_transport``. Where any differs,
the socket falls back to aiohttp's ordinary path.
Tripwire: ``tests/service/test_ingest_ws.py``.

``keepalive``: one sweeper pings every device socket; shutdown closes them with 1001 and lets
their handlers read the answer. Private parts of ``web.WebSocketResponse``: ``_writer`` (its
``close(code, message)``) and ``_set_closed()``. Tripwire: ``tests/service/test_shutdown.py``.

``resp``: the write path's own Redis connection, pre-encoded RESP on an asyncio transport with
hiredis parsing replies (redis-py's parser, public API). It bypasses redis-py's client, not
its internals. Tested in ``tests/service/test_resp.py``.
"""
