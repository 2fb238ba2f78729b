"""Training speed and memory: lmcraft vs transformers, one full step (forward + backward + AdamW step), same model.

    python -m bench.bench_train [--batch 8] [--seq-len 256] [--repeats 5] [--threads N] [--clock wall|cpu]
                                [--matmul-size 2048] [--precisions fp32 bf16 auto] [--skip-memory] [--compile]
                                [--device cpu|cuda]

Model: the llama-14m preset (14.6M parameters, vocabulary 8192) with random weights, saved once in Hugging Face
layout and loaded by both libraries: the same weights, the same batch (random token ids), the same thread count.
Each side runs its own training path:
- lmcraft: `hub.load_model`, the `clm` objective's loss (summed next-token cross-entropy / targets, what the
  Trainer minimises) and AdamW from `lmcraft.train.optim.build_optimizer` (what the Trainer uses);
- transformers: `LlamaForCausalLM` (sdpa attention), `model(input_ids, labels=input_ids).loss`, and fused AdamW
  (`adamw_torch_fused`, the HF Trainer's default optimizer with torch >= 2.8).
Precisions: fp32, and bf16 autocast (fp32 weights and optimizer, bf16 matmuls) on both sides; `auto` resolves,
for both sides alike, to what `lmcraft.precision` picks on this machine (each side at its best precision: bf16
where it is measured faster, e.g. CPUs with AMX). `--compile` adds a column: lmcraft with `torch.compile` of the
forward (lmcraft.train.compile), timed after its compiling warm-up step.

Throughput: tokens per step / best time over interleaved repeats (A B A B ...). `--clock cpu` times with this
process's CPU time instead of wall time: with `--threads 1` that is the time the step ran, whatever other
processes take from the machine (use it on a shared machine; with more threads, waiting threads count too).
Memory: peak RSS growth over two training steps (the first allocates gradients and AdamW state), each library in a
fresh subprocess: the peak (VmHWM) is reset through /proc/self/clear_refs, then peak VmHWM - VmRSS before the steps
(on CUDA: the peak of allocated GPU memory over the two steps minus the allocation before them).
MFU: 6 N tokens/s / P, with N the parameter count (the tied embedding counted once) and P the measured peak of the
row's precision, the best GFLOP/s of a square matmul (`--matmul-size`) in fp32 or bf16 with the same threads and
clock, timed in the same interleaved rounds as the training steps (and five more times per round). `--device cuda`
runs everything on the GPU (lmcraft's AdamW is then the fused CUDA kernel, as transformers'). Attention scores
(12 L T d FLOPs per token, about 10% more at T = 256) are not counted, as in the usual 6N definition.
The first step's losses of both sides are printed: same weights and batch give the same loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Table, compare, fmt, llama_14m_folder, machine, ratio, set_threads

LR = 1e-4
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_candidate(size: int, precision: str, device: torch.device) -> tuple[Callable[[], object], float]:
    """(one (size x size) @ (size x size) product in the precision's dtype, its FLOPs 2 size^3): timed among the
    training steps, so that the peak is measured under the same machine conditions as they are (on a shared VM it
    drifts by +-20%)."""
    a, b = (torch.randn(size, size, device=device).to(DTYPES[precision]) for _ in range(2))

    def run() -> None:
        a @ b
        sync(device)

    return run, 2 * size**3


def lmcraft_step(folder: Path, batch: torch.Tensor, precision: str,
                 compiled: bool = False) -> tuple[Callable[[], float], int]:
    """(one training step returning the loss, parameter count) on lmcraft's training path."""
    from lmcraft.hub import load_model
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train.optim import build_optimizer, param_groups

    model = load_model(folder, dtype=torch.float32, device=batch.device).train()
    if compiled:
        from lmcraft.train.compile import compile_model

        compile_model(model)
    objective = CausalLM()
    optimizer = build_optimizer(param_groups(model, lr=LR, weight_decay=0.0), LR, (0.9, 0.999), 1e-8)
    data = objective.transform({"input_ids": batch})

    def step() -> float:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = objective.loss(model, data)
        loss = out.loss_sum / out.num_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model.num_parameters()


def transformers_step(folder: Path, batch: torch.Tensor, precision: str) -> tuple[Callable[[], float], int]:
    """(one training step returning the loss, parameter count) as the HF Trainer runs it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(batch.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True)

    def step() -> float:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model.num_parameters()


BUILDERS = {"lmcraft": lmcraft_step, "transformers": transformers_step}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(library: str, folder: Path, batch_size: int, seq_len: int, precision: str,
                 device: torch.device) -> None:
    """Print {"peak_mb": ...}: peak RSS (CUDA: allocated GPU memory) growth of two training steps in this fresh
    process."""
    import transformers

    transformers.logging.set_verbosity_error()
    batch = torch.randint(0, 8192, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    step, _ = BUILDERS[library](folder, batch, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        step()
        print(json.dumps({"peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20}))
        return
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = _status_kb("VmRSS")
    step()
    step()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def peak_memory_mb(library: str, folder: Path, args: argparse.Namespace, precision: str) -> float:
    cmd = [sys.executable, "-m", "bench.bench_train", "--memory-child", library, str(folder), "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run([*cmd, "--precisions", precision], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (best kept)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both sides (default: all cores)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "auto"), default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="add lmcraft with torch.compile (lmcraft.train.compile)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--memory-child", nargs=2, metavar=("LIBRARY", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], Path(args.memory_child[1]), args.batch, args.seq_len, args.precisions[0],
                     torch.device(args.device))
        return 0
    clock = CLOCKS[args.clock]
    device = torch.device(args.device)
    tokens = args.batch * args.seq_len
    from lmcraft.precision import has_amx, resolve_precision

    print(f"# training step (forward + backward + AdamW), llama-14m, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.clock} clock — {machine()}, transformers {transformers.__version__}, "
          f"CPU AMX: {'yes' if has_amx() else 'no'}"
          f"{', ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}", flush=True)
    builders = dict(BUILDERS)
    if args.compile:
        builders["lmcraft compiled"] = lambda folder, batch, precision: lmcraft_step(folder, batch, precision, True)
    columns = ["precision", "lmcraft tok/s", "transformers tok/s", "ratio", "lmcraft MFU", "transformers MFU"]
    if args.compile:
        columns.insert(2, "lmcraft compiled tok/s")
    if not args.skip_memory:
        columns += ["lmcraft peak MB", "transformers peak MB", "memory ratio"]
    table = Table(columns)
    measured: list[tuple[str, str, dict[str, float], int, list[str]]] = []
    peak_seconds = {name: float("inf") for name in DTYPES}
    batch = torch.randint(0, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = llama_14m_folder(Path(tmp))
        for asked in args.precisions:
            choice = resolve_precision(asked, device)
            precision = choice.precision
            if asked == "auto":
                print(f"  auto -> {precision} ({choice.reason})", file=sys.stderr, flush=True)
            steps, params = {}, 0
            for name, build in builders.items():
                steps[name], params = build(folder, batch, precision)
            first = {name: step() for name, step in steps.items()}  # warm-up; the same weights give the same loss
            print(f"  {precision}: first-step loss lmcraft {first['lmcraft']:.6f}, "
                  f"transformers {first['transformers']:.6f}", file=sys.stderr, flush=True)
            matmul = matmul_candidate(args.matmul_size, precision, device)[0]
            matmul()
            matmuls = {f"matmul{i}": matmul for i in range(6)}
            best = compare({**steps, **matmuls}, args.repeats, warmup=0, clock=clock)  # the steps were warmed up
            peak_seconds[precision] = min([peak_seconds[precision], *(best.pop(name) for name in matmuls)])
            tps = {name: tokens / seconds for name, seconds in best.items()}
            memory = []
            if not args.skip_memory:
                mem = {name: peak_memory_mb(name, folder, args, precision) for name in BUILDERS}
                memory = [fmt(mem["lmcraft"], 0), fmt(mem["transformers"], 0),
                          f"{mem['lmcraft'] / mem['transformers']:.2f}x"]
            measured.append((precision if asked != "auto" else f"auto={precision}", precision, tps, params, memory))
            del steps
    peak = {name: 2 * args.matmul_size**3 / seconds / 1e9 for name, seconds in peak_seconds.items()
            if seconds < float("inf")}
    print(f"# matmul peak ({args.matmul_size}^2, best of the interleaved rounds): "
          + ", ".join(f"{name} {gflops:.1f} GFLOP/s" for name, gflops in peak.items()), flush=True)
    for label, precision, tps, params, memory in measured:
        mfu = {name: 6 * params * tps[name] / (peak[precision] * 1e9) for name in tps}
        compiled = [fmt(tps["lmcraft compiled"])] if args.compile else []
        table.add([label, fmt(tps["lmcraft"]), *compiled, fmt(tps["transformers"]),
                   ratio(tps["lmcraft"], tps["transformers"]), f"{mfu['lmcraft']:.0%}", f"{mfu['transformers']:.0%}",
                   *memory])
    table.print()
    print("ratio > 1: lmcraft faster; memory ratio < 1: lmcraft uses less. MFU = 6 N tok/s / the measured matmul "
          "peak of the row's precision.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
