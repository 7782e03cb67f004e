"""The ways in: the Python API (api), the input-file runner (infer_file), the terminal chat (chat),
the OpenAI-compatible server (server) and its Ray Serve scale-out (ray). They build on the
runtime; nothing below them imports them."""
