"""LLM generation: Llama-family engine with continuous batching and multi-LoRA (see engine.py)."""
