"""`pipeline serve` against llama.cpp's server (PyPI `xllamacpp`) on the same GGUF, side by side
in one run: 1, 8 and 64 concurrent streaming chat clients (the official `openai` client,
tests/fixtures/load_test.py), N new tokens each with EOS ignored; time to first token and
generated tokens per second, per client and aggregate.

    python3 bench/serve.py [--pipeline target/release/pipeline] [--clients 1,8,64] [--new-tokens 64]

Needs xllamacpp and openai (scripts/setup.sh installs both).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url, model, n, tokens):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests/fixtures/load_test.py"), url, model,
                          str(n), str(tokens), "--ignore-eos"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=os.path.join(ROOT, "target/release/pipeline"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--weights", default="auto", choices=["auto", "mixed", "q8", "f32", "quantized", "blocks"])
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    most = max(clients)
    rows = []

    port = free_port()
    srv = subprocess.Popen([a.pipeline, "--preset", "quick", "--set", f"generate.model={a.model}",
                            "--set", f"generate.weights={a.weights}", "--quiet", "serve", "--no-adapter",
                            "--port", str(port), "--batch-size", str(most)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if not srv.stdout.readline().startswith("listening on"):
            sys.exit("pipeline serve did not start")
        for n in clients:
            rows.append((f"pipeline serve ({a.weights})", n, load(f"http://127.0.0.1:{port}/v1", "base", n, a.new_tokens)))
    finally:
        srv.kill()
        srv.wait()

    for n in clients:
        port = free_port()
        srv = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/fixtures/llama_server.py"), a.model,
                                str(port), "--parallel", str(n), "--threads", str(a.threads), "--alias", "smollm2",
                                "--ctx", str(n * 512), "--watch-stdin"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            if srv.stdout.readline().strip() != f"ready {port}":
                sys.exit("llama.cpp's server did not start")
            rows.append(("llama.cpp server (xllamacpp, Q4_1)", n, load(f"http://127.0.0.1:{port}/v1", "smollm2", n, a.new_tokens)))
        finally:
            srv.kill()
            srv.wait()
        time.sleep(1)

    print(f"{a.new_tokens} new tokens per client, EOS ignored, {a.threads} threads, {os.cpu_count()} cores")
    print("| server | clients | median time to first token s | aggregate generated tok/s | per client tok/s |")
    print("|---|---|---|---|---|")
    for name, n, r in rows:
        print(f"| {name} | {n} | {r['ttft_median']:.2f} | {r['tok_s']:.1f} | {r['tok_s'] / n:.1f} |")


if __name__ == "__main__":
    main()
