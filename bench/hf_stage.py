"""The generate stage's peer in transformers: the recipe's first N prompts (the prompts stage's
rows, already through the chat template), the recipe's sampling (temperature 0.5, top-k 50,
top-p 0.95, at most --max-new-tokens), EOS on, in batches of B sorted by length (as this engine
orders them; a batch waits for its longest row, as `generate` does). Prints one JSON line per
batch size: prompts/s and generated tokens/s over the wall time, tokenization included.

Run from a virtualenv with torch, transformers, gguf and accelerate (transformers needs the last to
load a GGUF; bench/stage_peers.py passes the virtualenv's python):

    python bench/hf_stage.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts WORKDIR/cache/prompts/<key>/prompts.jsonl --n 200 --batch-size 16,64
"""
import argparse, json, os, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", default="16,64")
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
    with open(a.prompts) as fh:
        rows = [json.loads(line) for _, line in zip(range(a.n), fh)]
    texts = [r["prompt"] for r in rows]
    for bs in [int(x) for x in a.batch_size.split(",")]:
        order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i]).input_ids))
        torch.manual_seed(1234)
        generated = 0
        t0 = time.perf_counter()
        for s in range(0, len(order), bs):
            batch = [texts[i] for i in order[s:s + bs]]
            enc = tok(batch, return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, temperature=0.5, top_k=50, top_p=0.95,
                                     max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            # Tokens up to and including each row's first EOS (padding after it is not work).
            for row in new.tolist():
                n = len(row)
                if tok.eos_token_id in row:
                    n = row.index(tok.eos_token_id) + 1
                generated += n
        wall = time.perf_counter() - t0
        print(json.dumps({"engine": "transformers", "batch": bs, "prompts": len(texts),
                          "wall_s": wall, "prompts_per_s": len(texts) / wall,
                          "generated_tok_s": generated / wall, "generated": generated}), flush=True)


if __name__ == "__main__":
    main()
