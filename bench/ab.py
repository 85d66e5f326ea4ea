"""Two builds of `pipeline` side by side, in one sitting, alternating A B A B: `bench generate`
for each `--weights` choice and `bench train`, each in its own workdir. For a refactor that
must not change speed (docs/PERF.md records each such comparison with the machine's CPU).

    python3 bench/ab.py --a /path/to/old/pipeline --b target/release/pipeline \
        [--rounds 2] [--weights f32,quantized,mixed,q8,blocks] [--prompts 64] [--new-tokens 64]

Prints one Markdown table: per benchmark, each round's figure for A and B, the medians, and
B/A. Generation figures are end-to-end generated tokens per second (prefill included); training
is seconds per optimizer step and peak RSS. Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def checkout_of(binary):
    """The checkout a `target/release/pipeline` was built in (its own pipeline.toml and
    templates, which an older build must read), else this one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(binary))))
    return root if os.path.isfile(os.path.join(root, "pipeline.toml")) else ROOT


def run_json(binary, workdir, args):
    """`binary --workdir workdir ARGS --json` from its checkout; its JSON lines. The checkout
    needs `models/` (a link to this one's will do)."""
    cmd = [binary, "--workdir", workdir, "-q"] + args + ["--json"]
    out = subprocess.run(cmd, cwd=checkout_of(binary), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the baseline binary")
    ap.add_argument("--b", required=True, help="the binary under test")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weights", default="f32,quantized,mixed,q8,blocks")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=3, help="0: no training benchmark")
    ap.add_argument("--preset", default="quick")
    a = ap.parse_args()
    common = ["--preset", a.preset]
    def generate(w):
        return lambda rows: {f"generate {w}, batch {a.prompts}: tok/s": rows[-1]["end_to_end_tok_s"]}

    benches = [
        (
            common + ["bench", "generate", "--prompts", str(a.prompts), "--batch-size", str(a.prompts),
                      "--new-tokens", str(a.new_tokens), "--weights", w, "--repeat", "1"],
            generate(w),
        )
        for w in a.weights.split(",")
    ]
    if a.train_steps > 0:
        benches.append(
            (
                common + ["bench", "train", "--batch-size", "4", "--max-length", "256",
                          "--max-prompt-length", "192", "--steps", str(a.train_steps)],
                lambda rows: {"train: s/step": rows[-1]["step_s"], "train: peak RSS MiB": rows[-1]["peak_rss_mib"]},
            )
        )
    results = {}
    with tempfile.TemporaryDirectory() as wa, tempfile.TemporaryDirectory() as wb:
        for r in range(a.rounds):
            for args, pick in benches:
                for side, binary, wd in (("A", a.a, wa), ("B", a.b, wb)):
                    for name, v in pick(run_json(binary, wd, args)).items():
                        results.setdefault(name, {"A": [], "B": []})[side].append(v)
                        print(f"round {r + 1} {name} {side}: {v:.2f}", file=sys.stderr, flush=True)
    print("| benchmark | A (each round) | B (each round) | median A | median B | B/A |")
    print("|---|---|---|---|---|---|")
    for name in results:
        ra, rb = results[name]["A"], results[name]["B"]
        ma, mb = statistics.median(ra), statistics.median(rb)
        fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)
        print(f"| {name} | {fmt(ra)} | {fmt(rb)} | {ma:.2f} | {mb:.2f} | {mb / ma:.3f} |")


if __name__ == "__main__":
    main()
