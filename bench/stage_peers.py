"""The generate stage as users run it, against its peers, in one sitting: the recipe's prompts
(the default recipe's chat prompts with 3 shots, on SmolLM2's GGUF), its sampling, at most 64
new tokens, EOS on, through

- this engine: `pipeline bench stage generate` once per `--local` setting (a `generate.weights`
  value and a batch size, e.g. `auto:16`);
- llama.cpp's server (PyPI `xllamacpp`, Q4_1, prompt cache on) through this project's own
  `openai` backend, once per `--slots` value (slots = requests in flight);
- transformers `generate` (bench/hf_stage.py, run by `--hf-python`), once per `--hf-batch`.

Each round runs every configuration once, in that order, and `--rounds` alternates them; every
row of the table is one run. Prompts/s is the stage's figure of merit (the dataset is done when
the last review is).

    python3 bench/stage_peers.py --prompts 300 --local auto:16,f32:16 --slots 8,32 \
        --hf-python /path/to/venv/bin/python --hf-batch 16,64 [--rounds 2] [--avx2]

`--avx2` runs this engine as an AVX2-only CPU would (REVIEWER2_QKERNEL=avx2, and `--pipeline`
should name a build without gemm's AVX-512 kernels: `cargo build --release
--no-default-features --target-dir target-avx2`); llama.cpp's wheel picks its own kernels.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from llama_server import free_port, start_server  # noqa: E402


def stage(pipeline, common, sets, env):
    args = [pipeline, *common]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args + ["bench", "stage", "generate", "--json", "--prompts", str(A.prompts)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main():
    global A
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=os.path.join(ROOT, "target/release/pipeline"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--workdir", default="/tmp/reviewer2-stage-bench")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--local", default="auto:16")
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--hf-python", default="")
    ap.add_argument("--hf-batch", default="16,64")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--avx2", action="store_true")
    A = ap.parse_args()
    env = dict(os.environ)
    if A.avx2:
        env["REVIEWER2_QKERNEL"] = "avx2"
    common = ["--workdir", A.workdir, "--preset", "quick", "--quiet",
              "--set", f"generate.model={A.model}", "--set", "generate.max_new_tokens=64",
              "--set", f"scrape.count={(A.prompts + 1) // 2}"]
    rows = []
    for rnd in range(A.rounds):
        for spec in [s for s in A.local.split(",") if s]:
            weights, batch = spec.split(":")
            r = stage(A.pipeline, common, [f"generate.weights={weights}", f"generate.batch_size={batch}"], env)
            rows.append((rnd, f"this engine, weights {weights}", batch, r))
            print(json.dumps(rows[-1][3]), file=sys.stderr, flush=True)
        for p in [int(x) for x in A.slots.split(",") if x]:
            port = free_port()
            server = start_server(A.model, port, p, A.threads)
            try:
                r = stage(A.pipeline, common, [
                    "generate.backend=openai", f'generate.openai.endpoints=["http://127.0.0.1:{port}/v1"]',
                    "generate.openai.model=smollm2", f"generate.openai.concurrency={p}"], env)
                rows.append((rnd, "llama.cpp server (openai backend, Q4_1)", p, r))
                print(json.dumps(r), file=sys.stderr, flush=True)
            finally:
                server.kill()
                server.wait()
            time.sleep(1)
        if A.hf_python:
            latest = json.load(open(os.path.join(A.workdir, "cache/prompts/latest.json")))
            prompts = os.path.join(A.workdir, "cache/prompts", latest["key"], "prompts.jsonl")
            out = subprocess.run([A.hf_python, os.path.join(HERE, "hf_stage.py"), "--gguf", A.model,
                                  "--prompts", prompts, "--n", str(A.prompts), "--batch-size", A.hf_batch,
                                  "--threads", str(A.threads)], check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    rows.append((rnd, "transformers generate (f32)", r["batch"], r))
                    print(line, file=sys.stderr, flush=True)
    print(f"{A.prompts} prompts of the default recipe (SmolLM2-135M GGUF), at most 64 new tokens, EOS on, "
          f"{A.threads} threads{', AVX2 only' if A.avx2 else ''}")
    print("| round | engine | batch / slots | prompts/s | generated tok/s | wall s | prefill s | decode s | occupancy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rnd, name, b, r in rows:
        pre = r.get("prefill_s")
        dec = r.get("decode_s")
        occ = r.get("mean_occupancy")
        print(f"| {rnd + 1} | {name} | {b} | {r['prompts_per_s']:.2f} | {r['generated_tok_s']:.1f} | "
              f"{r['wall_s']:.1f} | {'' if pre is None else f'{pre:.1f}'} | "
              f"{'' if dec is None else f'{dec:.1f}'} | "
              f"{'' if occ is None or occ != occ else f'{occ * 100:.0f}%'} |")


if __name__ == "__main__":
    main()
