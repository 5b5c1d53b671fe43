"""`make ollama-e2e`: the demo model through a real Ollama v0.24.0 (run.py, on a private server.py)."""
