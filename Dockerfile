# syntax=docker/dockerfile:1
# SO8T (Qwen3-4B-Thinking-2507 with its SO(8) rotations folded into the weights) baked into an Ollama image.
#
#   so8t-export ollama MODEL_DIR --quant q8_0 --name so8t-qwen3-4b -o modelfiles   # GGUF next to the Modelfile
#   docker build -t so8t-qwen3-4b-ollama .
#   docker run -d --gpus=all -p 11434:11434 --name so8t so8t-qwen3-4b-ollama
#   docker exec -it so8t ollama run so8t-qwen3-4b
#
# The tag is the Ollama version so8t_export validates the Modelfile against (so8t_export.modelfile.OLLAMA_VERSION);
# change both together.
FROM ollama/ollama:0.32.15

# Models live outside $HOME, so a volume on /root/.ollama or another USER cannot hide them; set here, it holds
# for the build step and for every container. OLLAMA_GO_TEMPLATE=1 makes Ollama render prompts with the
# Modelfile's TEMPLATE rather than the GGUF's Jinja chat template (since v0.30 it chooses between the two).
ENV OLLAMA_MODELS=/models \
    OLLAMA_GO_TEMPLATE=1

# modelfiles/ (the Modelfile and the GGUF beside it) is bind-mounted for this step only, so the GGUF never
# becomes an image layer: the one copy in the image is the blob in $OLLAMA_MODELS that `ollama create` stores.
# `ollama create` is a client of a running server, and each RUN is a fresh shell, so the server starts, is
# polled until it answers, and is stopped within this one RUN. The key pair `ollama serve` generates is
# removed so containers do not share one.
RUN --mount=type=bind,source=modelfiles,target=/build,readonly \
    ollama serve >/tmp/ollama-serve.log 2>&1 & serve=$!; \
    tries=0; \
    until ollama list >/dev/null 2>&1; do \
        tries=$((tries + 1)); \
        if [ "$tries" -gt 120 ] || ! kill -0 "$serve" 2>/dev/null; then \
            echo "ollama serve did not come up:" >&2; cat /tmp/ollama-serve.log >&2; exit 1; \
        fi; \
        sleep 1; \
    done; \
    ollama create so8t-qwen3-4b -f /build/so8t-qwen3-4b.Modelfile; status=$?; \
    kill "$serve"; wait "$serve" 2>/dev/null; \
    rm -f /tmp/ollama-serve.log /root/.ollama/id_ed25519 /root/.ollama/id_ed25519.pub; \
    exit "$status"

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s CMD ["ollama", "list"]
