"""The Qwen2.5-VL mapping table: every megatron parameter of ``Qwen25VLModel`` and its HF tensors.

HF names are in the on-disk form (``visual.*``, ``model.*``, ``lm_head.*``); ``canonical_hf_name``
accepts transformers' in-memory form (``model.visual.*``, ``model.language_model.*``) too.
"""

from __future__ import annotations

from typing import Iterable

from megatron_ovr.config import Qwen25VLConfig

from .params import QKV, ColumnParallel, GatedMLP, ParamMapping, PatchEmbed, Replicated, RowParallel

_IN_MEMORY_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_hf_name(name: str) -> str:
    """transformers >= 4.52 in-memory names -> on-disk checkpoint names."""
    for in_memory, on_disk in _IN_MEMORY_PREFIXES:
        if name.startswith(in_memory):
            return on_disk + name[len(in_memory):]
    return name


def hf_in_memory_name(name: str) -> str:
    """On-disk checkpoint names -> transformers >= 4.52 in-memory names (for ``load_state_dict``)."""
    if name.startswith(tuple(in_memory for in_memory, _ in _IN_MEMORY_PREFIXES)):
        return name
    for in_memory, on_disk in _IN_MEMORY_PREFIXES:
        if name.startswith(on_disk) and not name.startswith(in_memory):
            return in_memory + name[len(on_disk):]
    return name


def _layer_norm_names(backend: str) -> tuple[str, str]:
    """TE fuses the pre-attention and pre-MLP norms into the following linear."""
    if backend == "te":
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


VALUE_HEAD_HF_NAME = "value_head.weight"
"""Where a critic checkpoint keeps its value head: ``[1, hidden]``, no bias (no transformers class has one)."""


def qwen2_5_vl_mappings(cfg: Qwen25VLConfig, backend: str = "torch", head: str = "lm") -> list[ParamMapping]:
    """The table of the policy (``head="lm"``) or of the PPO critic (``head="value"``: the trunk, and the value
    head where the LM output layer was)."""
    v, t = cfg.vision, cfg.text
    attn_norm, mlp_norm = _layer_norm_names(backend)
    vit, hv = "vision.decoder.layers.*.", "visual.blocks.*."
    lm, hl = "language_model.decoder.layers.*.", "model.layers.*."
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    vit_qkv = dict(num_heads=v.num_heads, num_groups=v.num_heads, head_dim=v.head_dim, stacked=True)
    lm_qkv = dict(num_heads=t.num_attention_heads, num_groups=t.num_key_value_heads, head_dim=t.head_dim)
    table: list[ParamMapping] = [
        PatchEmbed("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), conv_shape=conv_shape),
        Replicated(vit + attn_norm, (hv + "norm1.weight",)),
        QKV(vit + "self_attention.linear_qkv.weight", (hv + "attn.qkv.weight",), **vit_qkv),
        QKV(vit + "self_attention.linear_qkv.bias", (hv + "attn.qkv.bias",), **vit_qkv),
        RowParallel(vit + "self_attention.linear_proj.weight", (hv + "attn.proj.weight",)),
        Replicated(vit + "self_attention.linear_proj.bias", (hv + "attn.proj.bias",)),
        Replicated(vit + mlp_norm, (hv + "norm2.weight",)),
        GatedMLP(vit + "mlp.linear_fc1.weight", (hv + "mlp.gate_proj.weight", hv + "mlp.up_proj.weight")),
        GatedMLP(vit + "mlp.linear_fc1.bias", (hv + "mlp.gate_proj.bias", hv + "mlp.up_proj.bias")),
        RowParallel(vit + "mlp.linear_fc2.weight", (hv + "mlp.down_proj.weight",)),
        Replicated(vit + "mlp.linear_fc2.bias", (hv + "mlp.down_proj.bias",)),
        Replicated("vision.merger_norm.weight", ("visual.merger.ln_q.weight",)),
        ColumnParallel("vision.merger.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",)),
        ColumnParallel("vision.merger.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",)),
        RowParallel("vision.merger.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",)),
        Replicated("vision.merger.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",)),
        ColumnParallel("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Replicated(lm + attn_norm, (hl + "input_layernorm.weight",)),
        QKV(lm + "self_attention.linear_qkv.weight",
            (hl + "self_attn.q_proj.weight", hl + "self_attn.k_proj.weight", hl + "self_attn.v_proj.weight"), **lm_qkv),
        QKV(lm + "self_attention.linear_qkv.bias",
            (hl + "self_attn.q_proj.bias", hl + "self_attn.k_proj.bias", hl + "self_attn.v_proj.bias"), **lm_qkv),
        RowParallel(lm + "self_attention.linear_proj.weight", (hl + "self_attn.o_proj.weight",)),
        Replicated(lm + mlp_norm, (hl + "post_attention_layernorm.weight",)),
        GatedMLP(lm + "mlp.linear_fc1.weight", (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight")),
        RowParallel(lm + "mlp.linear_fc2.weight", (hl + "mlp.down_proj.weight",)),
        Replicated("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if head == "value":
        table.append(Replicated("language_model.output_layer.weight", (VALUE_HEAD_HF_NAME,)))
    elif t.tie_word_embeddings:
        # A pipeline's last stage keeps its own copy of the tied matrix; it is loaded, never exported.
        table.append(ColumnParallel("language_model.output_layer.weight", ("model.embed_tokens.weight",), export=False))
    else:
        table.append(ColumnParallel("language_model.output_layer.weight", ("lm_head.weight",)))
    return table


def expected_hf_names(cfg: Qwen25VLConfig, table: list[ParamMapping]) -> list[str]:
    """Every HF tensor name a complete checkpoint has, in table order."""
    names: list[str] = []
    for entry in table:
        if not entry.export:
            continue
        for pattern in entry.hf:
            if "*" not in pattern:
                names.append(pattern)
                continue
            count = cfg.vision.depth if pattern.startswith("visual.") else cfg.text.num_layers
            names.extend(pattern.replace("*", str(i)) for i in range(count))
    return names


def check_hf_names(cfg: Qwen25VLConfig, hf_names: Iterable[str], backend: str = "torch", head: str = "lm") -> None:
    """Raises naming every unknown and every missing HF tensor of a checkpoint."""
    expected = set(expected_hf_names(cfg, qwen2_5_vl_mappings(cfg, backend, head)))
    given = {canonical_hf_name(n) for n in hf_names}
    if cfg.text.tie_word_embeddings:
        given.discard("lm_head.weight")  # some tied checkpoints store the duplicate anyway
    unknown = sorted(given - expected)
    missing = sorted(expected - given)
    if unknown:
        raise KeyError(f"unknown HF tensor(s) for this Qwen2.5-VL config: {unknown[:10]}" + (" ..." if len(unknown) > 10 else ""))
    if missing:
        raise KeyError(f"HF checkpoint is missing tensor(s): {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
