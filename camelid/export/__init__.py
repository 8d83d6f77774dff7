"""Export to GGUF for llama.cpp / Ollama / LM Studio: `camelid export gguf` (see core.py)."""
