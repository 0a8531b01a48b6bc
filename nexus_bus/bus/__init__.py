"""The bus layer: what both ends of a request share (see docs/runtime.md).

The connection (`connection.py`, and the opt-in `_speedups/`), subjects (`subjects.py`),
request metadata (`metadata.py`), the body codec (`codec.py`), replies (`replies.py`) and the
nats-py exception mapping (`nats_errors.py`).
"""
