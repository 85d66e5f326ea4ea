"""This project's engine against llama.cpp's server, side by side in one run, on the same
prompts: the first N reviewer prompts of the workdir's recipe, N new tokens each, EOS ignored,
temperature 0.5, top-k 50, top-p 0.95.

For each parallelism P it starts llama.cpp's server (PyPI `xllamacpp`, which embeds it) with P
slots on the SmolLM2 GGUF and runs `pipeline bench generate --backend openai` against it with P
requests in flight; then it runs `pipeline bench generate` (the local engine) at batch P. Both
count end-to-end generated tokens per second, prefill included. At P = 1 it also sends the
same prompts (their chat messages) straight to the server once more and sums the server's own
`timings` (prompt and predicted tokens and milliseconds, prompt-cache hits included), for a
decode-only rate to set beside the local engine's `decode_tok_s`.

    python3 bench/llama_server.py --pipeline target/release/pipeline --preset quick \
        --parallel 1,64 --prompts 64 --new-tokens 64 [--threads 2] [--repeat 1]

Needs `python3 -m pip install xllamacpp` (scripts/setup.sh installs it).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_timings(port, workdir, n, new_tokens):
    """Decode-only and prefill rates from llama.cpp's own per-request timings."""
    import urllib.request

    latest = json.load(open(os.path.join(workdir, "cache/prompts/latest.json")))
    path = os.path.join(workdir, "cache/prompts", latest["key"], "prompts.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    tot = {"prompt_n": 0, "prompt_ms": 0.0, "predicted_n": 0, "predicted_ms": 0.0, "cache_n": 0}
    for r in rows:
        body = {"model": "smollm2", "messages": r["messages"], "max_tokens": new_tokens,
                "temperature": 0.5, "top_k": 50, "top_p": 0.95, "ignore_eos": True, "seed": r["id"]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        t = json.load(urllib.request.urlopen(req, timeout=600))["timings"]
        for k in tot:
            tot[k] += t.get(k, 0)
    return tot


def start_server(model, port, parallel, threads):
    """llama.cpp's server (tests/fixtures/llama_server.py) on `port` with `parallel` slots, ready."""
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/fixtures/llama_server.py"), model, str(port),
         "--parallel", str(parallel), "--threads", str(threads), "--alias", "smollm2",
         "--ctx", str(parallel * 512), "--watch-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = server.stdout.readline().strip()
    if line != f"ready {port}":
        server.kill()
        sys.exit(f"llama.cpp's server did not start ({line!r})")
    return server


def bench(pipeline, common, extra):
    out = subprocess.run(
        [pipeline, *common, "bench", "generate", "--json", *extra],
        check=True, capture_output=True, text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=os.path.join(ROOT, "target/release/pipeline"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--workdir", default=None, help="pipeline --workdir (default: its own)")
    ap.add_argument("--parallel", default="1,64")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--local-weights", default="f32", choices=["f32", "quantized", "mixed", "q8", "blocks"])
    a = ap.parse_args()

    common = ["--preset", a.preset, "--set", f"generate.model={a.model}", "--quiet"]
    if a.workdir:
        common = ["--workdir", a.workdir, *common]
    sizes = [int(x) for x in a.parallel.split(",")]
    shared = ["--prompts", str(a.prompts), "--new-tokens", str(a.new_tokens), "--repeat", str(a.repeat)]
    rows = []
    peer = None
    for p in sizes:
        port = free_port()
        server = start_server(a.model, port, p, a.threads)
        try:
            r = bench(a.pipeline, common + [
                "--set", f'generate.openai.endpoints=["http://127.0.0.1:{port}/v1"]',
                "--set", "generate.openai.model=smollm2",
            ], ["--backend", "openai", "--batch-size", str(p), *shared])[0]
            rows.append(("llama.cpp server (xllamacpp, Q4_1)", p, r["end_to_end_tok_s"], r["wall_s"]))
            if p == 1:
                peer = direct_timings(port, a.workdir or "data", a.prompts, a.new_tokens)
        finally:
            server.kill()
            server.wait()
        time.sleep(1)
    local_one = None
    for r in bench(a.pipeline, common, ["--batch-size", ",".join(map(str, sizes)),
                                        "--weights", a.local_weights, *shared]):
        rows.append((f"this project (local engine, {a.local_weights})", r["batch"], r["end_to_end_tok_s"], r["wall_s"]))
        if r["batch"] == 1:
            local_one = r
    print(f"{a.prompts} prompts, {a.new_tokens} new tokens each, EOS ignored, {a.threads} threads, "
          f"{os.cpu_count()} cores; end-to-end generated tokens/s, prefill included")
    print("| engine | parallel / batch | generated tok/s | wall s |")
    print("|---|---|---|---|")
    for name, p, t, w in rows:
        print(f"| {name} | {p} | {t:.1f} | {w:.1f} |")
    if peer and local_one:
        print()
        print("One stream, phases (llama.cpp: its own timings of a second pass over the same prompts)")
        print("| engine | decode tok/s | prefill tok/s (tokens computed) | prompt tokens reused from cache |")
        print("|---|---|---|---|")
        print(f"| llama.cpp server | {peer['predicted_n'] / peer['predicted_ms'] * 1e3:.1f} | "
              f"{peer['prompt_n'] / peer['prompt_ms'] * 1e3:.1f} | {peer['cache_n']} |")
        print(f"| this project ({a.local_weights}) | {local_one['decode_tok_s']:.1f} | "
              f"{local_one['prompt_tok_s']:.1f} (all prompt tokens over prefill time) | |")


if __name__ == "__main__":
    main()
