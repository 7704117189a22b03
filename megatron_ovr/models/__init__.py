"""Model definitions on megatron-core: Qwen2.5-VL (vision tower + mrope GPT decoder)."""
