"""Quantised layouts and the cheap parts of the quantiser: INT4 packing against modelopt's packer and vLLM's
AWQ decoder, folding AWQ scales exactly, option and calibration errors, the modelopt seam. No calibration."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_ovr.quant import FORMATS, QuantizeOptions, quantize_hf_dir
from megatron_ovr.quant.calibration import InputBuilder, load_calibration_samples
from megatron_ovr.quant.layouts import (
    AWQ_ORDER,
    dequantized_state_dict,
    modelopt_int4_to_awq,
    pack_awq,
    unpack_awq,
    unpack_modelopt_int4,
)
from megatron_ovr.quant.report import logit_deltas



def vllm_awq_decode(qweight: torch.Tensor) -> torch.Tensor:
    """vLLM 0.32's reading of an AutoAWQ qweight (auto_awq.py ``_convert_awq_to_standard_format``)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    unpacked = (qweight.unsqueeze(-1) >> shifts) & 0xF
    return unpacked[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(qweight.shape[0], -1)


def test_awq_packing_is_the_order_vllm_decodes():
    values = torch.arange(8).repeat(3, 2)  # [3, 16]
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2)
    assert packed[0, 0].item() == 0x75316420  # slot j holds column AWQ_ORDER[j]
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    random = torch.randint(0, 16, (64, 40))
    assert torch.equal(vllm_awq_decode(pack_awq(random)).long(), random)
    assert torch.equal(unpack_awq(pack_awq(random)), random)


def test_modelopt_int4_unpacking_inverts_modelopts_packer():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    torch.manual_seed(0)
    weight = torch.randn(6, 256)
    scale = weight.abs().reshape(6, 2, 128).amax(-1) / 7  # [out, in/G]
    packed = pack_int4_in_uint8(weight, scale, 128)
    expected = (weight / scale.repeat_interleave(128, 1)).round().clamp(-8, 7)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 256)
    assert torch.equal(unpack_modelopt_int4(packed).float(), expected)


def _pack_modelopt(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 ``[out, in]`` -> modelopt's uint8 ``[out/2, in]`` (row 2k low nibble, 2k+1 high)."""
    nibbles = (q & 0xF).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _int4_export(directory: Path, tensors: dict, exclude=("lm_head",)) -> Path:
    directory.mkdir()
    qc = {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ", "group_size": 128, "ignore": list(exclude),
          "producer": {"name": "modelopt", "version": "0.47.0"}}
    (directory / "config.json").write_text(json.dumps({"quantization_config": qc}))
    (directory / "hf_quant_config.json").write_text(json.dumps({"quantization": qc}))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _quantised(out: int, inp: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out, inp), generator=gen, dtype=torch.int8)
    scale = torch.rand(out, inp // 128, generator=gen) * 0.01 + 0.001
    return {"weight": _pack_modelopt(q), "weight_scale": scale}


def test_awq_repack_folds_down_proj_scale_into_up_proj_exactly(tmp_path):
    mlp = "model.layers.0.mlp"
    tensors = {}
    for name, (out, inp) in {"gate_proj": (256, 128), "up_proj": (256, 128), "down_proj": (128, 256)}.items():
        tensors.update({f"{mlp}.{name}.{k}": v for k, v in _quantised(out, inp, len(tensors)).items()})
    tensors[f"{mlp}.down_proj.pre_quant_scale"] = torch.rand(256) + 0.5
    tensors["model.norm.weight"] = torch.ones(128)
    directory = _int4_export(tmp_path / "export", tensors)
    before, _ = dequantized_state_dict(directory)
    qc = modelopt_int4_to_awq(directory, num_heads=4, num_kv_heads=2, scale_dtype=torch.float32)
    after, _ = dequantized_state_dict(directory)
    assert qc["quant_method"] == "awq" and qc["zero_point"] and qc["modules_to_not_convert"] == ["lm_head"]
    assert not (directory / "hf_quant_config.json").exists()

    x = torch.randn(5, 128)

    def mlp_out(w):
        gate, up, down = (w[f"{mlp}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    torch.testing.assert_close(mlp_out(after), mlp_out(before), rtol=1e-5, atol=1e-6)
    assert torch.equal(after[f"{mlp}.gate_proj.weight"], before[f"{mlp}.gate_proj.weight"])


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj", "visual.merger.mlp.2"])
def test_awq_repack_refuses_a_scale_it_cannot_fold(tmp_path, name):
    tensors = {f"{name}.{k}": v for k, v in _quantised(128, 128, 0).items()}
    tensors[f"{name}.pre_quant_scale"] = torch.rand(128) + 0.5
    directory = _int4_export(tmp_path / "export", tensors)
    with pytest.raises(ValueError, match="cannot be folded"):
        modelopt_int4_to_awq(directory, num_heads=4, num_kv_heads=2)  # grouped-query attention


def test_options_name_the_valid_formats_and_modes():
    with pytest.raises(ValueError, match=r"format='int8': choose one of \['fp8', 'int4_awq'\]"):
        QuantizeOptions(format="int8")
    with pytest.raises(ValueError, match=r"vision='drop': choose one of \['keep', 'quantize'\]"):
        QuantizeOptions(format="fp8", vision="drop")
    with pytest.raises(ValueError, match="int4_layout"):
        QuantizeOptions(format="int4_awq", int4_layout="gptq")
    assert set(FORMATS) == {"fp8", "int4_awq"}


def test_cli_rejects_a_wrong_format_before_loading_anything(tmp_path, capsys):
    from tools import quantize as cli

    rc = cli.main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "q"), "--format", "nvfp4"])
    assert rc == 2
    assert "format='nvfp4': choose one of ['fp8', 'int4_awq']" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_an_empty_calibration_set_is_a_clear_error(tmp_path, tiny_hf_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty calibration set: no usable sample in .*empty.jsonl"):
        load_calibration_samples([empty], 16)
    broken = tmp_path / "broken.jsonl"  # conversations, every one malformed (skipped)
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "images": ["a.png"]}) + "\n")
    with pytest.raises(ValueError, match="empty calibration set"):
        load_calibration_samples([broken], 16)
    with pytest.raises(ValueError, match="no calibration files given"):
        load_calibration_samples([], 16)
    # The tool fails the same way, before loading the model, and leaves no output behind.
    with pytest.raises(ValueError, match="empty calibration set"):
        quantize_hf_dir(tiny_hf_dir, tmp_path / "q", [empty], QuantizeOptions(format="fp8", progress=False))
    assert not (tmp_path / "q").exists()


def test_calibration_inputs_expand_images_like_the_engine(tmp_path, tiny_hf_dir):
    from megatron_ovr.data.synthetic_visual import write_rl_prompts

    prompts = write_rl_prompts(tmp_path / "rl", n_visual=2, n_text=2, seed=0)
    samples = load_calibration_samples([prompts], 4)
    builder = InputBuilder(tiny_hf_dir, max_tokens=512)
    inputs = builder.build_all(samples)
    with_images = [x for x in inputs if x.has_images]
    assert len(with_images) == 2 and len(inputs) == 4
    for x in with_images:  # a 112x84 image: 12 merged tokens (make_tiny_checkpoint's processor bounds)
        assert int((x.input_ids == builder.cfg.image_token_id).sum()) == 12
        assert x.position_ids.shape == (3, 1, x.num_tokens)
    short = InputBuilder(tiny_hf_dir, max_tokens=40)  # the system prompt alone is longer: the image is cut
    assert short(samples[[s.images != () for s in samples].index(True)]) is None and short.dropped == 1


def test_missing_modelopt_says_how_to_install(monkeypatch):
    from megatron_ovr.quant import backend

    for name in ("modelopt", "modelopt.torch", "modelopt.torch.quantization", "modelopt.torch.export"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"quantised export needs NVIDIA Model Optimizer .*pip install"):
        backend.require_modelopt()


def test_logit_deltas():
    ref = torch.randn(2, 7, 50)
    same = logit_deltas([ref], [ref.clone()])
    assert same.max_abs == 0 and same.rel_rms == 0 and same.top1_agreement == 1 and same.tokens == 14
    off = logit_deltas([ref], [ref * 1.1])
    assert off.rel_rms == pytest.approx(0.1, rel=1e-5) and off.mean_kl > 0
