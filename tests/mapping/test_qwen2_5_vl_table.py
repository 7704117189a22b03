"""The Qwen2.5-VL mapping table against the real HF model and the real megatron model (tiny sizes).

Catches: a table entry that falls behind either model (missing / extra / duplicate names), a wrong name
form conversion, a load or export that does not reproduce every HF tensor bit for bit (tied embeddings
included), and silent acceptance of a checkpoint that does not match the config.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from megatron_ovr.config import ParallelConfig, Qwen25VLConfig, get_preset
from megatron_ovr.mapping import export_hf_weights, load_hf_weights
from megatron_ovr.mapping.qwen2_5_vl import (
    canonical_hf_name,
    expected_hf_names,
    hf_in_memory_name,
    qwen2_5_vl_mappings,
)
from megatron_ovr.mapping.qwen2_5_vl import check_hf_names
from megatron_ovr.mapping.stream import bind_parameters
from megatron_ovr.models.qwen2_5_vl import reference


def _tiny() -> Qwen25VLConfig:
    return get_preset("tiny")


def _tiny_tied() -> Qwen25VLConfig:
    """The 3B's tied embeddings on the tiny sizes."""
    cfg = get_preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=True))


CONFIGS = {"tiny": _tiny, "tiny-tied": _tiny_tied}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]()
    hf_model = reference.build_hf_model(cfg, seed=0)
    return cfg, hf_model, reference.hf_state_dict(hf_model)


def _checkpoint_names(cfg, hf_model, state):
    """The HF tensors a checkpoint holds: with tied embeddings, transformers' state dict also lists
    ``lm_head.weight``, an alias of ``model.embed_tokens.weight`` that the table must not count twice."""
    names = set(state)
    if cfg.text.tie_word_embeddings:
        assert "lm_head.weight" in names
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.language_model.embed_tokens.weight.data_ptr()
        names.discard("lm_head.weight")
    return names


def test_table_covers_every_hf_tensor_exactly_once(case):
    cfg, hf_model, state = case
    expected = expected_hf_names(cfg, qwen2_5_vl_mappings(cfg))
    duplicates = [n for n, c in collections.Counter(expected).items() if c > 1]
    assert not duplicates, f"HF names produced by more than one table entry: {duplicates}"
    names = _checkpoint_names(cfg, hf_model, state)
    assert not names - set(expected), f"HF tensors the table misses: {sorted(names - set(expected))}"
    assert not set(expected) - names, f"table names the HF model lacks: {sorted(set(expected) - names)}"
    assert ("lm_head.weight" in expected) == (not cfg.text.tie_word_embeddings)
    check_hf_names(cfg, state)  # accepts the full state dict (tied alias included)


def test_hf_name_forms_round_trip(case):
    _, hf_model, state = case
    in_memory = list(hf_model.state_dict())
    assert any(n.startswith("model.visual.") for n in in_memory)
    assert any(n.startswith("model.language_model.") for n in in_memory)
    for name in in_memory:
        disk = canonical_hf_name(name)
        assert not disk.startswith(("model.visual.", "model.language_model."))
        assert hf_in_memory_name(disk) == name
        assert canonical_hf_name(disk) == disk  # idempotent on the on-disk form
    for disk in state:
        assert canonical_hf_name(hf_in_memory_name(disk)) == disk
    assert canonical_hf_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert canonical_hf_name("model.language_model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert hf_in_memory_name("model.norm.weight") == "model.language_model.norm.weight"
    assert hf_in_memory_name("visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert hf_in_memory_name("lm_head.weight") == "lm_head.weight" == canonical_hf_name("lm_head.weight")


def test_hf_in_memory_name_leaves_in_memory_names_alone(case):
    _, hf_model, _ = case
    for name in hf_model.state_dict():
        assert hf_in_memory_name(name) == name


def test_check_hf_names_accepts_in_memory_names(case):
    cfg, hf_model, _ = case
    check_hf_names(cfg, hf_model.state_dict().keys())


def test_check_hf_names_names_unknown_and_missing_keys(case):
    cfg, _, state = case
    with pytest.raises(KeyError, match=r"visual\.blocks\.0\.attn\.qkv\.extra"):
        check_hf_names(cfg, [*state, "visual.blocks.0.attn.qkv.extra"])
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        check_hf_names(cfg, [n for n in state if n != "model.layers.1.self_attn.k_proj.bias"])
    # A layer beyond the config's depth is unknown, not silently ignored.
    with pytest.raises(KeyError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        check_hf_names(cfg, [*state, "model.layers.2.input_layernorm.weight"])


def test_untied_checkpoint_without_lm_head_is_rejected():
    cfg = _tiny()
    names = [n for n in expected_hf_names(cfg, qwen2_5_vl_mappings(cfg)) if n != "lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head.weight"):
        check_hf_names(cfg, names)


# ---- the megatron model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_case(case, single_rank_megatron):
    from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks

    cfg, hf_model, state = case
    torch.manual_seed(123)
    chunks = build_model_chunks(cfg, ParallelConfig())
    return cfg, chunks, state


def test_bind_parameters_binds_every_parameter_once(megatron_case):
    cfg, chunks, _ = megatron_case
    table = qwen2_5_vl_mappings(cfg, chunks[0].backend)
    bound = bind_parameters(chunks, table)
    params = [p for chunk in chunks for p in chunk.parameters()]  # parameters() dedupes shared tensors
    assert len(bound) == len({id(b.param) for b in bound}) == len(params)
    assert {id(b.param) for b in bound} == {id(p) for p in params}
    assert len({b.name for b in bound}) == len(bound)
    # Every table entry is used (an unused entry means a renamed megatron parameter). With tied embeddings
    # a single stage has no output_layer parameter: it reuses the embedding, so that entry is idle here.
    unused = {e.megatron for e in table} - {b.entry.megatron for b in bound}
    assert unused == ({"language_model.output_layer.weight"} if cfg.text.tie_word_embeddings else set())
    # Layer-indexed entries resolve to every layer of their tower.
    layers = collections.defaultdict(set)
    for b in bound:
        if b.layer is not None:
            layers[b.name.split(".")[0]].add(b.layer)
    assert layers["vision"] == set(range(cfg.vision.depth))
    assert layers["language_model"] == set(range(cfg.text.num_layers))


def test_bind_parameters_rejects_an_unknown_parameter(megatron_case):
    cfg, chunks, _ = megatron_case
    table = [e for e in qwen2_5_vl_mappings(cfg, chunks[0].backend) if e.megatron != "vision.merger_norm.weight"]
    with pytest.raises(KeyError, match=r"vision\.merger_norm\.weight"):
        bind_parameters(chunks, table)


def test_load_then_export_is_bit_exact(megatron_case):
    cfg, chunks, state = megatron_case
    load_hf_weights(chunks, cfg, state.__getitem__)
    exported = list(export_hf_weights(chunks, cfg))
    names = [n for n, _ in exported]
    assert len(names) == len(set(names)), "an HF tensor was exported twice"
    want = {n: t for n, t in state.items() if not (cfg.text.tie_word_embeddings and n == "lm_head.weight")}
    assert set(names) == set(want)
    for name, tensor in exported:
        assert tensor.shape == want[name].shape, name
        assert tensor.dtype == want[name].dtype, name
        assert torch.equal(tensor, want[name]), name
    if cfg.text.tie_word_embeddings:
        assert "lm_head.weight" not in names
        lm = chunks[0].language_model
        assert torch.equal(lm.output_layer.weight if lm.output_layer.weight is not None
                           else lm.shared_embedding_or_output_weight(), state["model.embed_tokens.weight"])


def test_loaded_layers_compute_what_hf_computes(case, megatron_case):
    """A round trip cannot see a table that swaps gate/up or q/k consistently both ways: check that
    megatron's own QKV split and SwiGLU, on the loaded weights, give HF's projections (ViT and LM)."""
    _, hf_model, state = case
    cfg, chunks, _ = megatron_case
    load_hf_weights(chunks, cfg, state.__getitem__)
    hf = hf_model.model
    towers = [
        (chunks[0].vision.decoder.layers[1], hf.visual.blocks[1], cfg.vision.hidden_size,
         cfg.vision.num_heads, cfg.vision.num_heads, cfg.vision.head_dim),
        (chunks[0].language_model.decoder.layers[1], hf.language_model.layers[1], cfg.text.hidden_size,
         cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim),
    ]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer, hf_layer, hidden, heads, groups, head_dim in towers:
            x = torch.randn(5, 2, hidden, generator=gen)  # [s, b, h]
            out, bias = layer.mlp(x)
            torch.testing.assert_close(out + (bias if bias is not None else 0), hf_layer.mlp(x), rtol=1e-5, atol=1e-5)

            query, key, value = layer.self_attention.get_query_key_value_tensors(x, None)[:3]
            if hasattr(hf_layer, "attn"):  # ViT: stacked qkv
                q, k, v = hf_layer.attn.qkv(x).chunk(3, dim=-1)
            else:
                a = hf_layer.self_attn
                q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            torch.testing.assert_close(query, q.view(5, 2, heads, head_dim), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(key, k.view(5, 2, groups, head_dim), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(value, v.view(5, 2, groups, head_dim), rtol=1e-5, atol=1e-5)


def test_load_rejects_wrong_shape_naming_the_parameter(megatron_case):
    cfg, chunks, state = megatron_case
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(cfg.text.hidden_size + 2)
    with pytest.raises(ValueError, match=r"language_model\.decoder\.final_layernorm\.weight.*model\.norm\.weight"):
        load_hf_weights(chunks, cfg, bad.__getitem__)
    bad = dict(state)
    bad["visual.blocks.1.attn.qkv.weight"] = state["visual.blocks.1.attn.qkv.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"vision\.decoder\.layers\.1\.self_attention\.linear_qkv\.weight"):
        load_hf_weights(chunks, cfg, bad.__getitem__)


def test_validate_parallel_names_the_field():
    cfg = _tiny()
    cfg.validate_parallel(1)
    cfg.validate_parallel(2)
    with pytest.raises(ValueError, match=r"text\.num_attention_heads=4.*3"):
        cfg.validate_parallel(3)
    # Heads divide but the KV groups do not.
    with pytest.raises(ValueError, match=r"text\.num_key_value_heads=2.*4"):
        cfg.validate_parallel(4)
