"""The SO8T runtime behind the APIs users already speak.

    engine.py       one llama.cpp context: chat template, tokens, prompt scoring, streamed generation with a
                    head score per generated token (knows nothing of HTTP)
    gate.py         GatePolicy and the gated generation: input refusal, escalation flag, output gate with a
                    hold-back window, thinking split, stop strings; the `so8t` result object
    openai_api.py   /v1/chat/completions, /v1/completions, /v1/models, /v1/moderations (llama-server's shapes)
    ollama_api.py   /api/chat, /api/generate, /api/tags, /api/show, /api/version (Ollama's shapes)
    app.py          the FastAPI app: auth, limits, the bounded queue, /health, /metrics

The engine knows nothing of HTTP; the APIs know nothing of llama.cpp.
"""
