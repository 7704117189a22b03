"""Every example YAML loads into its config dataclass and spells out every field (the YAML mirrors the
dataclasses), and a typo is an error naming the key."""

from pathlib import Path

import pytest
import yaml

from megatron_ovr.config.io import from_dict, to_dict
from megatron_ovr.config.ppo import PPOConfig
from megatron_ovr.config.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted((ROOT / "cold_start").glob("*.yaml"))
CONFIG_OF = {"cold_start": SFTConfig, "rl": PPOConfig}
ALL_EXAMPLES = sorted(p for directory in CONFIG_OF for p in (ROOT / directory).glob("*.yaml"))


def _keys(tree, prefix=""):
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in ALL_EXAMPLES])
def test_example_mirrors_the_dataclasses(path):
    raw = yaml.safe_load(path.read_text())
    cfg = from_dict(CONFIG_OF[path.parent.name], raw)
    assert _keys(raw) == _keys(to_dict(cfg))


def test_ppo_budget_check_is_named():
    raw = yaml.safe_load((ROOT / "rl" / "tiny.yaml").read_text())
    raw["algorithm"]["micro_batch_tokens"] = 64
    with pytest.raises(ValueError, match="algorithm.micro_batch_tokens=64.*must hold the longest sample"):
        from_dict(PPOConfig, raw)


def test_unknown_key_is_named():
    raw = yaml.safe_load(EXAMPLES[0].read_text())
    raw["optimizer"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate"):
        from_dict(SFTConfig, raw)


def test_invalid_value_is_named():
    raw = yaml.safe_load(EXAMPLES[0].read_text())
    raw["optimizer"]["decay_style"] = "exponential"
    with pytest.raises(ValueError, match="optimizer.decay_style='exponential'"):
        from_dict(SFTConfig, raw)


def test_cross_section_check_is_named():
    raw = yaml.safe_load(EXAMPLES[0].read_text())
    raw["train_steps"] = raw["optimizer"]["warmup_steps"]
    with pytest.raises(ValueError, match="optimizer.warmup_steps=.*must be below train_steps"):
        from_dict(SFTConfig, raw)


def test_exponent_overrides_are_numbers(tmp_path):
    """PyYAML reads ``2e-4`` as a string (YAML 1.1); in a float field it is the number every user means."""
    from megatron_ovr.config.io import load_yaml

    cfg = load_yaml(PPOConfig, ROOT / "rl" / "tiny.yaml", ["actor_optimizer.lr=2e-4", "actor_optimizer.min_lr=1e-5"])
    assert cfg.actor_optimizer.lr == 2e-4 and cfg.actor_optimizer.min_lr == 1e-5
    with pytest.raises(ValueError, match=r"actor_optimizer\.lr: expected a number, got 'fast'"):
        load_yaml(PPOConfig, ROOT / "rl" / "tiny.yaml", ["actor_optimizer.lr=fast"])
