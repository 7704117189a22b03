"""Model configuration for Qwen2.5-VL: typed dataclasses, HF ``config.json`` round trip, presets.

Every field carries the HF name it comes from, so ``from_hf_config(to_hf_config(c)) == c``. The
megatron-core ``TransformerConfig`` objects are derived from these in ``models.qwen2_5_vl.model``; no
other module invents hyperparameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .checks import require


@dataclass(kw_only=True)
class VisionConfig:
    """The ViT (HF ``vision_config``)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    """SwiGLU width of each ViT block (gate/up/down with biases)."""
    out_hidden_size: int = 3584
    """Width the merger projects to; equals the LM hidden size."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    """Window side in pixels; in merged tokens it is window_size // spatial_merge_size // patch_size."""
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tokens_per_second: int = 2

    def __post_init__(self) -> None:
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        require(self.hidden_size % self.num_heads == 0, "vision.hidden_size", self.hidden_size,
                 f"must be divisible by vision.num_heads={self.num_heads}")
        require(all(0 <= i < self.depth for i in self.fullatt_block_indexes), "vision.fullatt_block_indexes",
                 self.fullatt_block_indexes, f"every index must lie in [0, depth={self.depth})")
        merged_window = self.window_size // self.spatial_merge_size // self.patch_size
        require(merged_window >= 1, "vision.window_size", self.window_size,
                 "must cover at least one merged token (spatial_merge_size * patch_size pixels)")
        require(self.hidden_act == "silu", "vision.hidden_act", self.hidden_act, "only silu is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened pixel patch (channels x temporal x patch x patch)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclass(kw_only=True)
class TextConfig:
    """The Qwen2 decoder (HF ``text_config``)."""

    num_layers: int = 28
    hidden_size: int = 3584
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        self.mrope_section = tuple(int(i) for i in self.mrope_section)
        require(self.hidden_size % self.num_attention_heads == 0, "text.hidden_size", self.hidden_size,
                 f"must be divisible by text.num_attention_heads={self.num_attention_heads}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "text.num_key_value_heads",
                 self.num_key_value_heads, f"must divide text.num_attention_heads={self.num_attention_heads}")
        require(len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim,
                 "text.mrope_section", self.mrope_section, f"must be 3 sections summing to head_dim/2={self.head_dim // 2}")
        require(self.hidden_act == "silu", "text.hidden_act", self.hidden_act, "only silu is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class Qwen25VLConfig:
    """The whole model: vision tower, merger and language model, plus the special token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        require(self.vision.out_hidden_size == self.text.hidden_size, "vision.out_hidden_size",
                 self.vision.out_hidden_size, f"must equal text.hidden_size={self.text.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            require(0 <= getattr(self, name) < self.text.vocab_size, name, getattr(self, name),
                     f"must be a token id below text.vocab_size={self.text.vocab_size}")

    def validate_parallel(self, tp: int) -> None:
        """Raises a clear error when the tensor-parallel size does not divide the model's widths."""
        checks = {
            "text.num_attention_heads": self.text.num_attention_heads,
            "text.num_key_value_heads": self.text.num_key_value_heads,
            "text.intermediate_size": self.text.intermediate_size,
            "text.vocab_size": self.text.vocab_size,
            "vision.num_heads": self.vision.num_heads,
            "vision.intermediate_size": self.vision.intermediate_size,
            "vision merger width (hidden_size * merge_unit)": self.vision.hidden_size * self.vision.merge_unit,
        }
        for name, value in checks.items():
            require(value % tp == 0, name, value, f"tensor-parallel size {tp} does not divide it")

    # ---- HF config.json round trip -------------------------------------------------------------

    def to_hf_config(self) -> dict:
        v, t = self.vision, self.text
        text_cfg = {
            "model_type": "qwen2_5_vl_text",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "vocab_size": t.vocab_size,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "tie_word_embeddings": t.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        vision_cfg = {
            "model_type": "qwen2_5_vl",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "in_channels": v.in_channels,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "hidden_act": v.hidden_act,
            "tokens_per_second": v.tokens_per_second,
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text_cfg,
            "vision_config": vision_cfg,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Qwen25VLConfig":
        """Accepts the nested (transformers >= 4.52) and the flat (older 7B ``config.json``) layouts."""
        text = hf.get("text_config") or hf
        vision = hf["vision_config"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 1000000.0)))
        tie = text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        return cls(
            vision=VisionConfig(
                depth=vision["depth"],
                hidden_size=vision["hidden_size"],
                num_heads=vision["num_heads"],
                intermediate_size=vision["intermediate_size"],
                out_hidden_size=vision["out_hidden_size"],
                patch_size=vision.get("patch_size", 14),
                temporal_patch_size=vision.get("temporal_patch_size", 2),
                in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
                spatial_merge_size=vision.get("spatial_merge_size", 2),
                window_size=vision.get("window_size", 112),
                fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
                hidden_act=vision.get("hidden_act", "silu"),
                tokens_per_second=vision.get("tokens_per_second", 2),
            ),
            text=TextConfig(
                num_layers=text["num_hidden_layers"],
                hidden_size=text["hidden_size"],
                num_attention_heads=text["num_attention_heads"],
                num_key_value_heads=text["num_key_value_heads"],
                intermediate_size=text["intermediate_size"],
                vocab_size=text["vocab_size"],
                rms_norm_eps=text.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                tie_word_embeddings=bool(tie),
                max_position_embeddings=text.get("max_position_embeddings", 128000),
                hidden_act=text.get("hidden_act", "silu"),
            ),
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            bos_token_id=hf.get("bos_token_id", 151643),
            eos_token_id=hf.get("eos_token_id", 151645),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
