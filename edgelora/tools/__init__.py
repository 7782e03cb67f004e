"""Measuring tools: bench (offline), bench-serve (a server under load) and the launcher that runs
``edgelora serve`` as a child process (serve_process)."""
