"""`lmcraft export MODEL --format gguf --quant q4_k_m OUT.gguf`: a model (or a PEFT adapter, merged first) as a
GGUF file for llama.cpp / Ollama, an Ollama Modelfile beside it, and a verification table.

    lmcraft export smollm2-135m-instruct --quant q8_0 runs/smollm2-q8_0.gguf

MODEL is a model folder, an asset name, a .gguf file or a PEFT adapter folder. The export ends with
`lmcraft verify-export` (exit code 1 when a check is outside its tolerance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmcraft.stages import add_overwrite_argument

QUANT_CHOICES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder, asset name, .gguf file or PEFT adapter folder")
    parser.add_argument("out", metavar="OUT.gguf", help="the file to write (an Ollama OUT.Modelfile goes beside it)")
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="output format (default: gguf)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="f16",
                        help="weight types, as llama.cpp names them; q4_k_m mixes Q4_K and Q6_K (default: f16)")
    add_overwrite_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.epilog = ("examples:\n  lmcraft export smollm2-135m-instruct out/smollm2.gguf --quant q8_0\n"
                     "  lmcraft export runs/sft/final out/sft-q4_k_m.gguf --quant q4_k_m   # a PEFT adapter, merged\n"
                     "  ollama create smollm2 -f out/smollm2.Modelfile")


def run(args: argparse.Namespace) -> int:
    from lmcraft.gguf_export import export_gguf, load_source
    from lmcraft.gguf_modelfile import modelfile_text
    from lmcraft.gguf_verify import report, verify_export
    from lmcraft.io import write_text
    from lmcraft.run_folder import OutputFolderError, claim_output_file

    out = Path(args.out)
    modelfile = out.with_suffix(".Modelfile")
    config = {"model": str(args.model), "format": args.format, "quant": args.quant, "output": str(out)}
    if modelfile.exists() and not out.exists():
        raise OutputFolderError(f"{modelfile} exists and lmcraft did not write it beside {out.name}; nothing was "
                                "changed. Choose another output file.")
    with claim_output_file(out, "export", config, args.overwrite, "output"):
        source = load_source(args.model)
        counts = export_gguf(source, out, args.quant, progress=not args.quiet)
        text, conversion = modelfile_text(out.name, source.tokenizer)
        write_text(modelfile, text)
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; tensors: {types})")
    if conversion.template is None:
        print(f"warning: {modelfile} has no TEMPLATE: the chat template was not converted ({conversion.reason}).",
              file=sys.stderr)
    print(f"wrote {modelfile} (chat template: {conversion.shape or 'not converted'})")
    return report(verify_export(out, source))
