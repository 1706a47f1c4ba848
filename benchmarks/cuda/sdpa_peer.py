#!/usr/bin/env python3
"""kvcache's CUDA decode next to PyTorch's scaled_dot_product_attention, in one run.

    benchmarks/cuda/sdpa_peer.py build/default/benchmarks/cuda/kvcache_cuda_bench [--json FILE]

Runs the benchmark binary (its Decode and DeviceCopy results, as JSON), then times SDPA on the
same shapes on the same GPU: one Llama-3-8B layer (32 query heads, 8 kv-heads, head_dim 128),
one query token per sequence, bf16 K/V of batch x T tokens in contiguous [batch, kv_heads, T,
head_dim] tensors (SDPA's own layout, so it reads no block table), GQA by enable_gqa. Like the
binary, it cycles through enough layers that each call's K/V is cold in L2, times each call by
CUDA events and reports the median. Prints one table: K/V GB/s of each and both over the
device-to-device copy rate measured in the same process (binary) or here (PyTorch).
"""
import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = (1, 16, 64)
TOKENS = (1024, 4096, 16384, 32768)
COLD_BYTES = 1 << 30


def event_ms(fn):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def copy_rate():
    source = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    best = min(event_ms(lambda: target.copy_(source)) for _ in range(10))
    return 2 * source.numel() * source.element_size() / (best * 1e-3)


def sdpa_rate(batch, tokens):
    layer_bytes = 2 * batch * KV_HEADS * tokens * HEAD_DIM * 2
    layers = max(1, min(256, -(-COLD_BYTES // layer_bytes)))
    kv = [(torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
           torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))
          for _ in range(layers)]
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    times = []
    for i in range(max(50, 2 * layers)):
        k, v = kv[i % layers]
        times.append(event_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
    del kv
    torch.cuda.empty_cache()
    return layer_bytes / (statistics.median(times[5:]) * 1e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    result = subprocess.run([args.binary, "--benchmark_filter=DeviceCopy|Decode", "--benchmark_format=json",
                             "--benchmark_repetitions=5", "--benchmark_report_aggregates_only=true"],
                            check=True, capture_output=True, text=True)
    ours = {}
    for bench in json.loads(result.stdout)["benchmarks"]:
        if bench.get("aggregate_name") != "median" or not bench["name"].startswith("Decode/"):
            continue
        ours[(int(bench["batch"]), int(bench["tokens"]))] = (bench["bytes_per_second"], bench["copy_fraction"])

    torch_copy = copy_rate()
    table = []
    print(f"{'batch':>5} {'T':>6} | {'kvcache GB/s':>12} {'of copy':>8} | {'SDPA GB/s':>10} {'of copy':>8} | speed-up")
    for batch in BATCHES:
        for tokens in TOKENS:
            rate, fraction = ours.get((batch, tokens), (float("nan"), float("nan")))
            peer = sdpa_rate(batch, tokens)
            row = {"batch": batch, "tokens": tokens, "kvcache_bytes_per_second": rate,
                   "kvcache_copy_fraction": fraction, "sdpa_bytes_per_second": peer,
                   "sdpa_copy_fraction": peer / torch_copy, "torch_copy_bytes_per_second": torch_copy}
            table.append(row)
            print(f"{batch:>5} {tokens:>6} | {rate / 1e9:>12.1f} {fraction:>8.3f} | {peer / 1e9:>10.1f} "
                  f"{peer / torch_copy:>8.3f} | {rate / peer:>7.2f}x")
    print(f"device-to-device copy (read + write): torch {torch_copy / 1e9:.1f} GB/s; "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
