"""megatron-ovr: the Open Vision Reasoner recipe (Qwen2.5-VL cold-start SFT, multimodal PPO) on
Megatron-Core. Layers import one way: config -> models (+ parallel) -> mapping -> checkpoint -> tools."""

__version__ = "0.1.0"
