"""The numbers of docs/results/export-smollm2-gguf.md: SmolLM2-135M-Instruct (and a LoRA fine-tune of it) exported
to GGUF by lmcraft, run in llama.cpp; perplexity on held-out web text, per-tensor types against llama.cpp's own
quantiser (`llama_model_quantize`, i.e. llama-quant), and which tensors cost the q4_k_m perplexity.

    nice -n 5 python docs/results/export-smollm2-gguf.py --out /work/runs/llamacpp/gguf \
        [--adapter /work/runs/llamacpp/sft/final]

The llama.cpp rows need llama-cpp-python (the `llamacpp` extra); without it only lmcraft's side runs.
Held-out text: the first `--tokens` tokens of the c4-demo asset (web text; not in the alpaca demo the LoRA
trains on), scored in windows of 512 tokens;
perplexity = exp(mean NLL) over every token after the first of each window.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lmcraft.assets import fetch, resolve_model
from lmcraft.gguf_export import Source, export_gguf, load_source
from lmcraft.io import write_json

WINDOW = 512
QUESTION = "What is the capital of France?"


def held_out(tokenizer: Any, n_tokens: int) -> list[list[int]]:
    lines = (fetch("c4-demo") / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()
    ids: list[int] = []
    for line in lines:
        ids += tokenizer.encode(json.loads(line)["text"] + "\n\n", add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    return [ids[i:i + WINDOW] for i in range(0, n_tokens, WINDOW)]


def perplexity(model: Any, windows: list[list[int]]) -> float:
    """exp(mean over windows and positions t >= 1 of -log p(x_t | x_<t)), float64 log-softmax."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].double()
            nll -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(w[1:])[:, None]).sum())
            count += len(w) - 1
    return math.exp(nll / count)


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def type_summary(types: dict[str, str]) -> dict[str, str]:
    """Per tensor kind (token_embd, attn_q, ..., ffn_down): the types it has, with counts."""
    kinds: dict[str, Counter[str]] = {}
    for name, kind in types.items():
        if name.endswith("norm.weight"):
            continue
        key = name.split(".")[-2] if name.startswith("blk.") else name.removesuffix(".weight")
        kinds.setdefault(key, Counter())[kind] += 1
    return {k: ", ".join(f"{n} {t}" for t, n in sorted(c.items())) for k, c in sorted(kinds.items())}


def llama_quantize(src: Path, out: Path, requantize: bool = False) -> Path:
    """llama.cpp's own q4_k_m (llama-quant: its type choice and quantisers, no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = requantize
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src}")
    return out


def imported(path: Path) -> Any:
    """The GGUF file read back by lmcraft's importer (dequantised to float32)."""
    from lmcraft.gguf_import import write_hf_model
    from lmcraft.hub import load_model

    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(path, tmp, progress=False)
        return load_model(tmp, head="lm", dtype="float32")


def ablation(source: Any, quantised: Any, types: dict[str, str], windows: list[list[int]]) -> dict[str, Any]:
    """Perplexity of the source with only one group of weights replaced by their dequantised q4_k_m values, and each
    group's relative weight error ||W_q - W|| / ||W||."""
    from lmcraft.gguf_layout import gguf_name
    from lmcraft.hub.save import hf_state_dict

    theirs = dict(quantised.state_dict())
    groups: dict[str, list[str]] = {}
    for name, tensor in hf_state_dict(source.model).items():  # for llama, 2-D HF names are lmcraft's names
        if tensor.dim() >= 2:
            groups.setdefault(types[gguf_name("llama", name)[0]], []).append(name)
    out: dict[str, Any] = {}
    base = {k: v.clone() for k, v in source.model.state_dict().items()}
    for qtype, params in sorted(groups.items()):
        if qtype == "F32":
            continue
        err = sum(float((theirs[p] - base[p]).pow(2).sum()) for p in params)
        ref = sum(float(base[p].pow(2).sum()) for p in params)
        mixed = {**base, **{p: theirs[p] for p in params}}
        if source.model.config.tie_word_embeddings:  # one tensor under two keys: the last one loaded wins
            mixed["head.weight"] = mixed["model.embed_tokens.weight"]
        source.model.load_state_dict(mixed)
        out[qtype] = {"tensors": len(params), "rel_weight_error": math.sqrt(err / ref),
                      "ppl_only_these_quantised": perplexity(source.model, windows)}
    source.model.load_state_dict(base)
    return out


def paris(path: Path, source: Source) -> dict[str, str]:
    """The answer to QUESTION, greedy, 24 tokens: through lmcraft's backend (our tokenizer and chat template, ids
    fed to llama.cpp) and through llama-cpp-python's own `create_completion` on the rendered prompt text."""
    import llama_cpp

    from lmcraft.generate import GenerationConfig, generate_text
    from lmcraft.generate.llamacpp_backend import LlamaCppModel

    model = LlamaCppModel(path, source.model.config)
    ours = generate_text(model, source.tokenizer, QUESTION, GenerationConfig(max_new_tokens=24), chat=True).texts[0]
    model.close()
    prompt = source.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, seed=0)
    plain = llm.create_completion(prompt, max_tokens=24, temperature=0.0, stop=["<|im_end|>"])["choices"][0]["text"]
    return {"lmcraft backend": ours, "llama_cpp.Llama": plain}


def torch_answer(model: Any, source: Source) -> str:
    """The answer to QUESTION from lmcraft's torch decoder (greedy, 24 tokens, chat template)."""
    from lmcraft.generate import GenerationConfig, generate_text

    return generate_text(model, source.tokenizer, QUESTION, GenerationConfig(max_new_tokens=24), chat=True).texts[0]


def study(source: Source, out: Path, windows: list[list[int]], original: Path | None, tag: str,
          detail: bool, ablate: bool = False) -> dict[str, Any]:
    """Exports of `source` (f32, q4_k_m; with `detail` also q8_0), their perplexity read back by lmcraft's
    dequantiser (torch), the Paris answers and (`ablate`) the perplexity with one type group of lmcraft's q4_k_m at a
    time. With llama_cpp: also llama.cpp's own q4_k_m of the f32 export (and, given the `original` GGUF, of that
    file), every file's perplexity and Paris answers in llama.cpp, and the tensor types of each."""
    from lmcraft.generate.llamacpp_backend import LlamaCppModel, llama_cpp_available

    result: dict[str, Any] = {"ppl": {}, "types": {}}
    result["ppl"]["torch, unquantised f32"] = perplexity(source.model, windows)
    result["paris"] = {"torch, unquantised f32": torch_answer(source.model, source)}
    files = {}
    llama = llama_cpp_available()
    for quant in ("f32", "q8_0", "q4_k_m") if detail and llama else ("f32", "q4_k_m") if llama else ("q4_k_m",):
        files[f"lmcraft {quant}"] = out / f"{tag}-{quant}.gguf"
        export_gguf(source, files[f"lmcraft {quant}"], quant, progress=False)
    ours = imported(files["lmcraft q4_k_m"])
    result["ppl"]["torch, lmcraft q4_k_m dequantised"] = perplexity(ours, windows)
    result["paris"]["torch, lmcraft q4_k_m dequantised"] = torch_answer(ours, source)
    print(json.dumps(result), flush=True)
    if llama:
        files["llama-quant q4_k_m (from lmcraft f32)"] = llama_quantize(files["lmcraft f32"],
                                                                        out / f"{tag}-lq4km.gguf")
        if original is not None:
            files["original Q4_1 GGUF"] = original
            files["llama-quant q4_k_m (requantised from Q4_1)"] = llama_quantize(
                original, out / f"{tag}-rq4km.gguf", requantize=True)
        for name, path in files.items():
            model = LlamaCppModel(path, source.model.config)
            result["ppl"][f"llama.cpp, {name}"] = perplexity(model, windows)
            model.close()
            print(name, result["ppl"][f"llama.cpp, {name}"], flush=True)
        for name in ("lmcraft f32", "lmcraft q4_k_m", "llama-quant q4_k_m (from lmcraft f32)"):
            result["paris"][f"llama.cpp, {name}"] = paris(files[name], source)
    result["types"] = {name: type_summary(tensor_types(path)) for name, path in files.items()}
    if ablate:
        result["ablation lmcraft q4_k_m"] = ablation(source, ours, tensor_types(files["lmcraft q4_k_m"]), windows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, help="a LoRA run's final/ folder (recipes/sft-smollm2-lora.yaml)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="also the per-type-group perplexities (slow)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    base = load_source("smollm2-135m-instruct")
    windows = held_out(base.tokenizer, args.tokens)
    results["held_out"] = {"tokens": sum(len(w) for w in windows), "windows": len(windows), "source": "c4-demo"}
    if not args.skip_base:
        original = next(resolve_model("smollm2-135m-instruct").glob("*.gguf"))
        results["base"] = study(base, args.out, windows, original, "base", detail=True,
                                ablate=args.ablation)
        write_json(args.out / "results.json", results)
    if args.adapter is not None:
        results["lora"] = study(load_source(str(args.adapter)), args.out, windows, None, "lora", detail=False)
    write_json(args.out / "results.json", results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
