"""Under torchrun: the actor (megatron, TP=N) streams its weights into a colocated vLLM engine started with
dummy weights; then the engine samples responses to a text and an image prompt, and megatron scores the
same tokens. Writes both log-prob lists (and the sync report) as JSON for the test to compare."""

import argparse
import json

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from megatron_ovr.config import ParallelConfig
from megatron_ovr.config.sft import ModelSection, OptimizerSection
from megatron_ovr.data.tokenizer import qwen_tokenizer_dir
from megatron_ovr.distributed import init_distributed, shutdown_distributed
from megatron_ovr.rl.driver import HEAD_MASK, reduce_log_probs_and_entropy
from megatron_ovr.rl.experience import Sample, pack_samples
from megatron_ovr.rollout import RolloutRequest, SamplingSettings, build_engine
from megatron_ovr.rollout.model_dir import ImageProcessor, write_engine_dir
from megatron_ovr.rollout.weight_sync import sync_weights
from megatron_ovr.training.core import ModelTrainer

TEXT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
IMAGE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many squares?<|im_end|>\n<|im_start|>assistant\n"


def picture() -> Image.Image:
    image = Image.new("RGB", (112, 84), "white")
    draw = ImageDraw.Draw(image)
    for x in (10, 50):
        draw.rectangle([x, 20, x + 25, 45], fill="red")
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--engine-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig(tensor_parallel=args.tp))
    actor = ModelTrainer(ModelSection(hf_dir=args.hf_dir), ParallelConfig(tensor_parallel=args.tp),
                         OptimizerSection(), total_steps=1)
    # Move the weights away from the checkpoint's, deterministically per element (so replicated copies
    # stay equal across TP ranks): the engine can only match megatron through the sync.
    with torch.no_grad():
        for param in actor.model[0].module.parameters():
            param.add_(0.05 * torch.sin(1000 * param))
    cfg = actor.model_cfg
    if dist.get_rank() == 0:
        write_engine_dir(args.engine_dir, cfg, qwen_tokenizer_dir(), min_pixels=56 * 56, max_pixels=112 * 112)
    dist.barrier()
    engine = build_engine("vllm", model_dir=args.engine_dir, max_model_len=512, dtype="float32", seed=0,
                          dummy_weights=True)
    report = sync_weights(actor.chunks, cfg, engine, bucket_bytes=8 * 2**20)
    image = picture()
    completions = engine.generate([RolloutRequest(TEXT), RolloutRequest(IMAGE, [image])],
                                  SamplingSettings(max_new_tokens=12, samples_per_prompt=2, seed=7))
    pixel_values, grid = ImageProcessor(args.engine_dir)([image])
    samples, engine_log_probs = [], []
    for prompt_index, per_prompt in enumerate(completions):
        for completion in per_prompt:
            images = dict(pixel_values=pixel_values, image_grid_thw=grid) if prompt_index == 1 else {}
            samples.append(Sample(completion.prompt_token_ids, completion.token_ids, **images))
            engine_log_probs.append(completion.log_probs)
    packed = pack_samples(samples, row_length=256, cfg=cfg, pad_id=cfg.bos_token_id)
    rows = actor.forward_only(
        packed.microbatches,
        reduce_log_probs_and_entropy,
        num_outputs=2,
        head_mask=HEAD_MASK,  # as the PPO driver runs it
    )
    megatron_log_probs = packed.to_samples([r[0] for r in rows])
    if dist.get_rank() == 0:
        result = {
            "engine": engine_log_probs,
            "megatron": [megatron_log_probs[i, : len(lp)].tolist() for i, lp in enumerate(engine_log_probs)],
            "sync": {"seconds": report.seconds, "bytes": report.bytes, "buckets": report.buckets,
                     "tensors": report.tensors},
            "image_tokens": sum(t == cfg.image_token_id for t in samples[-1].prompt_ids),
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    engine.close()
    shutdown_distributed()


if __name__ == "__main__":
    main()
