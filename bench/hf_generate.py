"""Baseline for `pipeline bench generate`: Hugging Face transformers' `generate` on the same GGUF
model, the same reviewer prompts, batch and token count. Run it from a virtualenv outside the repo:

    python bench/hf_generate.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts data/cache/prompts/<key>/prompts.jsonl --n 64 --new-tokens 64 --batch-size 1,8,16,32,64
"""
import argparse, json, os, resource, statistics, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", default="1,8,16,32,64")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    rows = [json.loads(l) for l in open(a.prompts)][: a.n]
    prompts = [r["prompt"] for r in rows]
    n_prompt_tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {len(prompts)} prompts ({n_prompt_tokens} prompt tokens), "
          f"{a.new_tokens} new tokens each")
    print("| batch | generated tok/s (incl. prefill) | wall s | peak RSS MiB |")
    print("|---|---|---|---|")
    for bs in [int(x) for x in a.batch_size.split(",")]:
        walls = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(prompts), bs):
                    enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
                    model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                   do_sample=True, temperature=0.5, top_k=50, top_p=0.95,
                                   pad_token_id=tok.pad_token_id)
            walls.append(time.perf_counter() - t0)
        w = statistics.median(walls)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {bs} | {len(prompts) * a.new_tokens / w:.1f} | {w:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
