"""The table of bench/losses.sh: one row per loss, from each run's log (stage times) and its
train and eval outputs in the workdir's cache (the train summary's last eval, the eval report).

    python3 bench/losses_table.py WORKDIR sigmoid ipo simpo orpo
"""
import json
import os
import re
import sys


def built(log, stage):
    m = re.search(rf"Built {stage} in ([0-9.]+)s", log)
    return float(m.group(1)) if m else None


def main():
    work, losses = sys.argv[1], sys.argv[2:]
    print("| loss | reference | train stage s (of it: reference log-probs) | 40 steps s | eval stage s "
          "| eval loss | eval reward accuracy | harsher, lexicon [95%] | harsher, trained judge [95%] "
          "| repeats a sentence | repeated 4-gram | hit 64 tokens | distinct-2 | mean chars |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for loss in losses:
        log = open(os.path.join(work, f"{loss}.log")).read()
        train_key = re.search(r"Building train \(([0-9a-f]+)\)", log)
        eval_key = re.search(r"Building eval \(([0-9a-f]+)\)", log).group(1)
        r = json.load(open(os.path.join(work, "cache/eval", eval_key, "report.json")))
        steps = re.search(r"Trained \d+ steps in ([0-9.]+)s", log)
        ref = re.search(r"Built train-ref in ([0-9.]+)s", log)
        train_s = built(log, "train")
        ref_s = float(ref.group(1)) if ref else None
        if ref_s is None and train_s is not None and steps:
            # Reference log-probs computed inside the train stage (the first loss that needs them).
            ref_s = train_s - float(steps.group(1))
        needs = "no" if loss in ("simpo", "orpo") else "yes"
        lex, tr = r["judges"]["lexicon"], r["judges"]["trained"]

        def rate(j):
            lo, hi = j["harsher_rate_ci"]
            return f"{j['harsher_rate'] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}]"

        base = r
        print(f"| {loss} | {needs} | {train_s if train_s is not None else 'cached'} "
              f"({'-' if needs == 'no' else f'{ref_s:.0f}' if ref_s is not None and ref_s > 1 else 'shared'}) | "
              f"{float(steps.group(1)) if steps else '-'} | {built(log, 'eval')} | "
              f"{r['eval_loss']:.3f} | {r['eval_reward_accuracy']:.2f} | {rate(lex)} | {rate(tr)} | "
              f"{r['repeat_sentence_adapter'] * 100:.0f}% | {r['repeat_ngram_adapter'] * 100:.0f}% | "
              f"{r['hit_max_tokens_adapter'] * 100:.0f}% | {r['distinct2_adapter']:.3f} | "
              f"{r['mean_chars_adapter']:.0f} |")
    if base:
        print(f"| (base model) | | | | | | | | | {base['repeat_sentence_base'] * 100:.0f}% | "
              f"{base['repeat_ngram_base'] * 100:.0f}% | {base['hit_max_tokens_base'] * 100:.0f}% | "
              f"{base['distinct2_base']:.3f} | {base['mean_chars_base']:.0f} |")


if __name__ == "__main__":
    main()
