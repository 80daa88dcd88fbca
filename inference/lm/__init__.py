"""Gemma-3 language model stage: loading, LoRA merge, injection, greedy decoding."""
