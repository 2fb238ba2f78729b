"""Training-step speed at each side's best precision, with MFU: lmcraft vs transformers, and LoRA vs peft.

    python -m bench.bench_train [--tables full lora] [--batch 8] [--seq-len 256] [--repeats 5] [--threads N]
                                [--clock wall|cpu] [--matmul-size 2048] [--precisions fp32 bf16] [--no-compile]
                                [--max-slowdown 3] [--memory] [--device cpu|cuda] [--model llama-14m|smollm2-135m]

One step = forward + loss + backward + AdamW update + zero_grad on a fixed random batch (`--batch` x `--seq-len`
token ids), on the llama-14m preset (14.6M parameters, vocabulary 8192; random weights saved once in Hugging Face
layout and loaded by both libraries: the same weights, batch and thread count), or with `--model smollm2-135m` on
SmolLM2-135M (the asset, or random weights of its shape where it cannot be fetched; ids below 8192 either way).
Each side runs its own training path:
- lmcraft: `hub.load_model`, the `clm` objective's loss (next-token cross-entropy through the LM head in chunks,
  summed / targets: what the Trainer minimises) and AdamW from `train.optim.build_optimizer` (fused);
  "compiled" = `train.compile.compile_model` (what `trainer.compile: true` does), timed after its compiling step;
- transformers: `LlamaForCausalLM` (sdpa attention), `model(input_ids, labels=input_ids).loss` and fused AdamW
  (`adamw_torch_fused`, the HF Trainer's default with torch >= 2.8), eager, as its users run it.
The `lora` table: LoRA r = 8, alpha 16 on q_proj/v_proj (PEFT's defaults, bench_peft's config) through
`lmcraft.peft.apply` vs `peft.get_peft_model`, only the adapters in the optimizer.

Rows: each library eager in fp32 and in bf16 autocast (fp32 weights, optimizer state and loss; bf16 matrix
products), and lmcraft compiled at the precision `precision: auto` picks on this machine. All rows of a table run
side by side in interleaved rounds (A B C A B C ...), best of `--repeats`, after one warm-up step each. Each
library's best row is marked; "vs transformers best" divides a row's throughput by transformers' (peft's) best row.
A bf16 row is left out (and says why) where the CPU's bf16 matmul is more than `--max-slowdown` times slower than
fp32 by `lmcraft.precision`'s cached measurement: it cannot be the best there, and its steps would take minutes.

MFU = F x tokens/s / P, with FLOPs per token
    full training:  F = 6 N + 12 L T d
    LoRA:           F = 4 N + 2 N_trainable + 12 L T d
N the parameter count (a tied embedding counted once: the LM head's product), L layers, T the sequence length,
d = heads x head_dim: 6N is the forward (2N) and backward (4N: input and weight gradients) products, LoRA computes
no weight gradient of the frozen weights (2N per token saved, 2 N_trainable added); 12 L T d are the attention
products (Q K^T and A V, 2 x 2 T d per layer forward, x 3 with the backward; the causal half is counted, as PaLM
does). P is the peak of the row's precision, measured here: the best FLOP/s of a `--matmul-size` square matmul
(2 n^3 FLOPs) in that dtype, timed six times per round inside the same interleaved rounds (on a shared machine the
peak drifts with the load, so it is measured under the same conditions as the steps).

`--clock cpu` times this process's CPU time instead of wall time: with `--threads 1` that is the time the step ran,
whatever other processes take (use it on a shared machine). `--memory`: peak RSS growth over two steps of each
eager row, each in a fresh subprocess (VmHWM reset through /proc/self/clear_refs; on CUDA the peak allocated).
The first step's losses are printed: the same weights and batch give the same loss on both sides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.bench_peft import LORA
from bench.common import Table, compare, fmt, llama_14m_folder, machine, ratio, set_threads, smollm2_folder

LR = 1e-4
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
THEIRS = {"full": "transformers", "lora": "peft+transformers"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_candidate(size: int, precision: str, device: torch.device) -> Callable[[], None]:
    """One (size x size) @ (size x size) product (2 size^3 FLOPs) in the precision's dtype."""
    a, b = (torch.randn(size, size, device=device).to(DTYPES[precision]) for _ in range(2))

    def run() -> None:
        a @ b
        sync(device)

    return run


@dataclass
class Step:
    """One training step (returns the loss) and what its FLOPs per token are made of."""

    run: Callable[[], float]
    params: int
    trainable: int

    def flops_per_token(self, table: str, attention: int) -> int:
        weights = 6 * self.params if table == "full" else 4 * self.params + 2 * self.trainable
        return weights + attention


def _optimizer_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], precision: str,
                    device: torch.device, optimizer: torch.optim.Optimizer) -> Step:
    def run() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return float(loss.detach())

    params = sum(p.numel() for p in model.parameters())
    return Step(run, params, sum(p.numel() for p in model.parameters() if p.requires_grad))


def lmcraft_step(folder: Path, batch: torch.Tensor, precision: str, table: str, compiled: bool = False) -> Step:
    """lmcraft's training path (full or LoRA), eager or compiled as `trainer.compile: true` compiles."""
    from lmcraft import peft
    from lmcraft.hub import load_model
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = load_model(folder, dtype=torch.float32, device=batch.device)
    if table == "lora":
        model = peft.apply(model, {"method": "lora", **LORA})
    model.train()
    if compiled:
        from lmcraft.train.compile import compile_model

        compile_model(model)
    objective = CausalLM()
    optimizer = build_optimizer(param_groups(model, lr=LR, weight_decay=0.0), LR, (0.9, 0.999), 1e-8)
    data = objective.transform({"input_ids": batch})

    def loss_of() -> torch.Tensor:
        out = objective.loss(model, data)
        return out.loss_sum / out.num_targets

    return _optimizer_step(model, loss_of, precision, batch.device, optimizer)


def transformers_step(folder: Path, batch: torch.Tensor, precision: str, table: str) -> Step:
    """transformers' step (with peft's LoRA for the lora table) as the HF Trainer runs it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(batch.device)
    if table == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.0, fused=True)
    return _optimizer_step(model, lambda: model(input_ids=batch, labels=batch).loss, precision, batch.device,
                           optimizer)


@dataclass(frozen=True)
class Row:
    """One candidate: library ("lmcraft" or "transformers"), compiled or eager, precision ("fp32" or "bf16")."""

    library: str
    compiled: bool
    precision: str

    @property
    def key(self) -> str:
        """'<library>[ compiled] <precision>', how a memory subprocess is told the row."""
        return " ".join([self.library, *(["compiled"] if self.compiled else []), self.precision])

    @classmethod
    def parse(cls, key: str) -> Row:
        *library, precision = key.split()
        return cls(library[0], library[-1] == "compiled", precision)

    def label(self, table: str) -> str:
        name = ("lmcraft LoRA" if table == "lora" else "lmcraft") if self.library == "lmcraft" else THEIRS[table]
        return f"{name}{' compiled' if self.compiled else ''}"

    def build(self, folder: Path, batch: torch.Tensor, table: str) -> Step:
        if self.library == "lmcraft":
            return lmcraft_step(folder, batch, self.precision, table, self.compiled)
        return transformers_step(folder, batch, self.precision, table)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(row: Row, table: str, folder: Path, batch_size: int, seq_len: int, device: torch.device) -> None:
    """Print {"peak_mb": ...}: peak RSS (CUDA: allocated GPU memory) growth of two training steps of `row` in this
    fresh process."""
    batch = torch.randint(0, 8192, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    step = row.build(folder, batch, table).run
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


def peak_memory_mb(row: Row, table: str, folder: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "bench.bench_train", "--memory-child", row.key, table, str(folder), "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def bf16_excluded(precisions: list[str], device: torch.device, max_slowdown: float) -> str | None:
    """Why the bf16 rows are left out on this machine (None: they are measured)."""
    if "bf16" not in precisions or device.type != "cpu":
        return None
    from lmcraft.precision import cpu_seconds

    seconds, cached = cpu_seconds("train")
    slowdown = seconds["bf16"] / seconds["fp32"]
    if slowdown <= max_slowdown:
        return None
    return (f"bf16 rows left out: a bf16 matmul is {slowdown:.1f}x slower than fp32 on this CPU (precision.py's "
            f"micro-benchmark: fp32 {seconds['fp32'] * 1e3:.2f} ms, bf16 {seconds['bf16'] * 1e3:.2f} ms{cached}), "
            f"more than --max-slowdown {max_slowdown:g}")


def run_table(table: str, folder: Path, batch: torch.Tensor, args: argparse.Namespace, best_precision: str,
              precisions: list[str]) -> None:
    """Measure one table's rows side by side and print it."""
    device, clock = batch.device, CLOCKS[args.clock]
    rows = [Row(library, False, p) for library in ("transformers", "lmcraft") for p in precisions]
    if args.compile:
        rows.append(Row("lmcraft", True, best_precision))
    steps: dict[Row, Step] = {}
    first: dict[Row, float] = {}
    for row in rows:
        steps[row] = row.build(folder, batch, table)
        t0 = time.perf_counter()
        first[row] = steps[row].run()  # warm-up (the compiled row compiles here)
        print(f"  {table}: {row.label(table)} {row.precision}: first step {time.perf_counter() - t0:.1f} s, "
              f"loss {first[row]:.8f}", file=sys.stderr, flush=True)
    check_first_losses(first)
    used = sorted({row.precision for row in rows})
    matmuls = {}
    for precision in used:
        run = matmul_candidate(args.matmul_size, precision, device)
        run()
        matmuls.update({(precision, i): run for i in range(6)})
    best = compare({**{row: step.run for row, step in steps.items()}, **matmuls}, args.repeats, warmup=0,
                   clock=clock)
    peak = {p: 2 * args.matmul_size**3 / min(best[(p, i)] for i in range(6)) / 1e9 for p in used}
    tps = {row: batch.numel() / best[row] for row in rows}
    memory = {row: peak_memory_mb(row, table, folder, args) for row in rows if args.memory and not row.compiled}
    from lmcraft.models import preset

    cfg = preset("llama-14m")
    attention = 12 * cfg.num_layers * batch.shape[1] * cfg.num_heads * cfg.head_dim
    best_of = {lib: max((r for r in rows if r.library == lib), key=tps.__getitem__) for lib in ("lmcraft",
                                                                                             "transformers")}
    theirs = THEIRS[table]
    out = Table(["row", "precision", "tok/s", f"vs {theirs} best", "MFU", "GFLOP/token",
                 *(["peak MB"] if args.memory else [])])
    for row in rows:
        flops = steps[row].flops_per_token(table, attention)
        out.add([row.label(table) + (" (best)" if best_of[row.library] == row else ""), row.precision,
                 fmt(tps[row]), ratio(tps[row], tps[best_of["transformers"]]),
                 f"{flops * tps[row] / (peak[row.precision] * 1e9):.0%}", f"{flops / 1e9:.3f}",
                 *([fmt(memory[row], 0) if row in memory else "-"] if args.memory else [])])
    what = "LoRA r=8 on q/v" if table == "lora" else "full training"
    print(f"\n## {what}: batch {batch.shape[0]} x {batch.shape[1]} tokens; matmul peak ({args.matmul_size}^2, best "
          "of the interleaved rounds): " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peak.items()), flush=True)
    out.print()
    print(f"ratio: {ratio(tps[best_of['lmcraft']], tps[best_of['transformers']])} ({table}: lmcraft's best row vs "
          f"{theirs}' best row)", flush=True)


def check_first_losses(first: dict[Row, float], tolerance: float = 1e-5) -> None:
    """The first step's losses (same weights, same batch): lmcraft compiled vs eager in fp32 must agree to
    `tolerance` (an AssertionError otherwise); lmcraft vs transformers is printed."""
    for row, loss in first.items():
        other = Row("lmcraft" if row.compiled else "transformers", False, row.precision)
        if row.library == "lmcraft" and other in first:
            diff = abs(loss - first[other])
            print(f"  first-step loss, {row.key} vs {other.key}: |difference| {diff:.1e}", file=sys.stderr)
            if row.compiled and row.precision == "fp32" and diff > tolerance:
                raise AssertionError(f"compiled and eager fp32 losses differ by {diff:.2e} > {tolerance:g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (best kept)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both sides (default: all cores)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="eager rows' precisions (the compiled row runs at precision auto's choice)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="no compiled lmcraft row")
    parser.add_argument("--max-slowdown", type=float, default=3.0,
                        help="leave bf16 rows out where a CPU bf16 matmul is this many times slower than fp32")
    parser.add_argument("--memory", action="store_true", help="peak memory of the eager rows (subprocesses)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--model", choices=("llama-14m", "smollm2-135m"), default="llama-14m",
                        help="smollm2-135m: the asset, or random weights of its shape where it cannot be fetched")
    parser.add_argument("--memory-child", nargs=3, metavar=("ROW", "TABLE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        key, table, folder = args.memory_child
        memory_child(Row.parse(key), table, Path(folder), args.batch, args.seq_len, device)
        return 0
    from lmcraft.precision import has_amx, resolve_precision

    choice = resolve_precision("auto", device)
    print(f"# training step (forward + backward + AdamW), {args.model}, {args.clock} clock — {machine()}, "
          f"transformers {transformers.__version__}, CPU AMX: {'yes' if has_amx() else 'no'}"
          f"{', ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; "
          f"precision auto -> {choice.precision} ({choice.reason})", flush=True)
    precisions = list(dict.fromkeys(args.precisions))
    why = bf16_excluded(precisions, device, args.max_slowdown)
    if why:
        print(f"# {why}", flush=True)
        precisions.remove("bf16")
    batch = torch.randint(0, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = llama_14m_folder(Path(tmp)) if args.model == "llama-14m" else smollm2_folder(Path(tmp))
        for table in args.tables:
            run_table(table, folder, batch, args, choice.precision, precisions)
    print("MFU = F tok/s / P (F: 6N + 12LTd full, 4N + 2N_trainable + 12LTd LoRA; P: the measured matmul peak of "
          "the row's precision); vs ... best > 1: faster than the reference's best row.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
