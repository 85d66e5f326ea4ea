"""Baseline for `pipeline bench train`: TRL's DPOTrainer with PEFT LoRA (r 8 on q/k/v) on the same
GGUF model (dequantized to f32), the same pairs, batch and lengths. Run from a virtualenv outside
the repo:

    python bench/trl_dpo.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --pairs data/cache/prompts/<key>/pair_prompts.jsonl --batch-size 4 --max-length 256 --steps 5
"""
import argparse, json, os, resource, time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

POOL = [
    ("The paper is poorly written and irrelevant. It's not interesting at all.",
     "The paper is well written, relevant and interesting."),
    ("The proposed method has serious technical flaws and is not properly evaluated.",
     "The proposed method achieves state-of-the-art in multiple benchmarks."),
    ("The paper only provides theoretical results and lacks in experimental validation.",
     "The paper provides theoretical explanations and also rigorous experimental results."),
    ("The approach lacks in novelty and doesn't actually work for blackbox LLMs.",
     "The approach is novel and well defined and does work for blackbox LLMs."),
]


class Timer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # transformers refuses to train a GGUF-loaded model: write the dequantized weights as a plain
    # folder and load that.
    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict())
    del q
    rows = [json.loads(l) for l in open(a.pairs)]
    data = Dataset.from_list([
        {"prompt": r["prompt"], "chosen": POOL[i % 4][0], "rejected": POOL[i % 4][1]} for i, r in enumerate(rows)
    ])
    cfg = DPOConfig(
        output_dir="/tmp/trl-bench", per_device_train_batch_size=a.batch_size, max_steps=a.steps + 1,
        learning_rate=5e-4, lr_scheduler_type="cosine", beta=0.1, max_length=a.max_length,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        precompute_ref_log_probs=True, seed=42,
    )
    for k, v in {"max_prompt_length": a.max_prompt_length}.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    timer = Timer()
    tr = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft,
                    callbacks=[timer])
    tr.train()
    steps = timer.times[1:]
    s = sum(steps) / len(steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import trl, peft as p
    print(f"TRL {trl.__version__}, PEFT {p.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {a.batch_size} pairs, max_length {a.max_length}, precompute_ref_log_probs")
    print("| s/step | warm-up step s | peak RSS MiB |")
    print("|---|---|---|")
    print(f"| {s:.2f} | {timer.times[0]:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
