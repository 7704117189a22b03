"""Model and parallel configuration: presets, the HF config.json round trip (nested and flat legacy
layouts, and through transformers' own config class), and validation messages."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from megatron_ovr.config import PRESETS, ParallelConfig, Qwen25VLConfig, TextConfig, VisionConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = get_preset(name)
    assert isinstance(cfg, Qwen25VLConfig)
    assert cfg.vision.out_hidden_size == cfg.text.hidden_size
    hf = cfg.to_hf_config()
    assert hf["text_config"]["rope_parameters"]["mrope_section"] == list(cfg.text.mrope_section)
    back = Qwen25VLConfig.from_hf_config(hf)
    assert back == cfg
    assert get_preset(name) is not get_preset(name)  # fresh objects: callers may mutate them


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_transformers_config(name):
    cfg = get_preset(name)
    hf = transformers.Qwen2_5_VLConfig(**cfg.to_hf_config())
    t, v = hf.text_config, hf.vision_config
    assert t.hidden_size == cfg.text.hidden_size
    assert t.num_hidden_layers == cfg.text.num_layers
    assert t.num_attention_heads == cfg.text.num_attention_heads
    assert t.num_key_value_heads == cfg.text.num_key_value_heads
    assert t.intermediate_size == cfg.text.intermediate_size
    assert t.vocab_size == cfg.text.vocab_size
    assert list(t.rope_parameters["mrope_section"]) == list(cfg.text.mrope_section)
    assert t.rope_parameters["rope_theta"] == cfg.text.rope_theta
    assert v.depth == cfg.vision.depth and v.hidden_size == cfg.vision.hidden_size
    assert v.num_heads == cfg.vision.num_heads and v.intermediate_size == cfg.vision.intermediate_size
    assert list(v.fullatt_block_indexes) == list(cfg.vision.fullatt_block_indexes)
    assert bool(hf.tie_word_embeddings) == cfg.text.tie_word_embeddings
    # What transformers would write to config.json reads back to the same config.
    assert Qwen25VLConfig.from_hf_config(hf.to_dict()) == cfg


def test_7b_preset_matches_design_facts():
    cfg = get_preset("7b")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert t.head_dim == 128
    assert t.intermediate_size == 18944
    assert t.vocab_size == 152064
    assert t.mrope_section == (16, 24, 24)
    assert t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6
    assert t.tie_word_embeddings is False
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size) == (32, 1280, 16, 3420)
    assert v.head_dim == 80
    assert v.fullatt_block_indexes == (7, 15, 23, 31)
    assert v.window_size == 112 and v.patch_size == 14 and v.temporal_patch_size == 2
    assert v.out_hidden_size == 3584
    assert v.patch_dim == 1176
    assert v.rope_theta == 1e4
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, 151645)


def test_3b_preset_ties_embeddings():
    assert get_preset("3b").text.tie_word_embeddings is True
    assert all(not get_preset(n).text.tie_word_embeddings for n in ("tiny", "7b", "32b", "72b"))


def _legacy_flat_7b() -> dict:
    """The layout of the original Qwen2.5-VL-7B-Instruct config.json (transformers 4.4x): text keys at the
    top level, ``rope_scaling`` with ``type: mrope``, ``rope_theta`` at the top, ``in_chans`` in the ViT."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    }


def test_legacy_flat_7b_config_json():
    assert Qwen25VLConfig.from_hf_config(_legacy_flat_7b()) == get_preset("7b")


def test_legacy_flat_layout_reads_every_field():
    """Non-default values everywhere, so a field silently taken from a default is caught."""
    hf = _legacy_flat_7b()
    hf.update(rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=4096,
              image_token_id=151000, rope_scaling={"type": "mrope", "mrope_section": [32, 16, 16]})
    hf["vision_config"].update(in_chans=1, window_size=224, fullatt_block_indexes=[3, 31], tokens_per_second=4)
    cfg = Qwen25VLConfig.from_hf_config(hf)
    assert cfg.text.rope_theta == 5e5
    assert cfg.text.rms_norm_eps == 1e-5
    assert cfg.text.tie_word_embeddings is True
    assert cfg.text.max_position_embeddings == 4096
    assert cfg.text.mrope_section == (32, 16, 16)
    assert cfg.image_token_id == 151000
    assert cfg.vision.in_channels == 1
    assert cfg.vision.window_size == 224
    assert cfg.vision.fullatt_block_indexes == (3, 31)
    assert cfg.vision.tokens_per_second == 4


def test_nested_layout_with_rope_scaling_in_text_config():
    """transformers 4.5x wrote nested configs with ``rope_scaling`` + ``rope_theta`` inside text_config."""
    cfg = get_preset("tiny")
    hf = cfg.to_hf_config()
    text = hf["text_config"]
    del text["rope_parameters"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [6, 4, 6]}
    text["rope_theta"] = 12345.0
    back = Qwen25VLConfig.from_hf_config(hf)
    assert back.text.mrope_section == (6, 4, 6)
    assert back.text.rope_theta == 12345.0


# ---- validation --------------------------------------------------------------------------------------


def test_bad_mrope_section_names_field_and_value():
    with pytest.raises(ValueError, match=r"text\.mrope_section=\(16, 24, 23\).*64"):
        TextConfig(mrope_section=(16, 24, 23))
    with pytest.raises(ValueError, match=r"text\.mrope_section"):
        TextConfig(mrope_section=(32, 32))


def test_heads_not_dividing_name_field_and_value():
    with pytest.raises(ValueError, match=r"text\.hidden_size=3584.*num_attention_heads=27"):
        TextConfig(num_attention_heads=27)
    with pytest.raises(ValueError, match=r"text\.num_key_value_heads=3.*28"):
        TextConfig(num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"vision\.hidden_size=1280.*num_heads=3"):
        VisionConfig(num_heads=3)


def test_fullatt_index_out_of_range_names_field_and_value():
    with pytest.raises(ValueError, match=r"vision\.fullatt_block_indexes=\(7, 15, 23, 32\).*depth=32"):
        VisionConfig(fullatt_block_indexes=(7, 15, 23, 32))
    with pytest.raises(ValueError, match=r"vision\.fullatt_block_indexes=\(-1,\)"):
        VisionConfig(fullatt_block_indexes=(-1,))


def test_other_validation_errors():
    with pytest.raises(ValueError, match=r"vision\.out_hidden_size=1000.*3584"):
        Qwen25VLConfig(vision=VisionConfig(out_hidden_size=1000))
    with pytest.raises(ValueError, match=r"image_token_id=151655.*vocab_size=1000"):
        tiny = get_preset("tiny")
        Qwen25VLConfig(vision=tiny.vision, text=dataclasses.replace(tiny.text, vocab_size=1000))
    with pytest.raises(ValueError, match=r"vision\.window_size=20"):
        VisionConfig(window_size=20)
    with pytest.raises(ValueError, match=r"text\.hidden_act='gelu'"):
        TextConfig(hidden_act="gelu")


def test_dict_sub_configs_are_converted():
    cfg = Qwen25VLConfig(**get_preset("tiny").to_dict())
    assert cfg == get_preset("tiny")
    assert isinstance(cfg.text, TextConfig) and isinstance(cfg.vision, VisionConfig)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'8b'") as err:
        get_preset("8b")
    for name in PRESETS:
        assert repr(name) in str(err.value)


# ---- ParallelConfig ----------------------------------------------------------------------------------


def test_parallel_config_defaults_and_size():
    p = ParallelConfig()
    assert (p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.sequence_parallel) == (1, 1, 1, False)
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=3, context_parallel=4).model_parallel_size == 24
    ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    ParallelConfig(pipeline_parallel=2, virtual_pipeline=2)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ValueError, match=r"sequence_parallel.*tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)


@pytest.mark.parametrize("field", ["tensor_parallel", "pipeline_parallel", "context_parallel"])
@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_non_positive_sizes_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"parallel\.{field}={value!r}"):
        ParallelConfig(**{field: value})


def test_virtual_pipeline_needs_pipeline():
    with pytest.raises(ValueError, match=r"virtual_pipeline=2"):
        ParallelConfig(virtual_pipeline=2)
    with pytest.raises(ValueError, match=r"virtual_pipeline=1"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline=1)
