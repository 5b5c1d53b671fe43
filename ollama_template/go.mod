module so8t/ollama_template

go 1.19
