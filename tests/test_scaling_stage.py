"""`lmcraft scaling` end to end on generated play scripts and four micro models (seconds): the runs share the first
run's tokenizer and packed data, the fits, plot, probe and reports are written, a rerun skips finished runs, and
config mistakes are caught before any work."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmcraft.cli import main
from lmcraft.config import load_config, validate_config
from lmcraft.errors import ConfigError
from lmcraft.scaling.config import ScalingConfig
from lmcraft.scaling.plan import plan_runs
from lmcraft.scaling.sections import GridSection
from lmcraft.stages.scaling import scaling

CAST = ["ALICE", "BOB", "CAROL", "DAVE", "EVE", "FRANK", "GRACE"]
WORDS = "the a good lord king night day sword crown love death fair sweet my thy heart speak come go now".split()


def write_plays(folder: Path, plays: int = 10, speeches: int = 80, seed: int = 0) -> str:
    """Play scripts: scenes where two or three characters take turns, each speech a 'NAME.' line and a verse."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(plays):
        cast = rng.sample(CAST, 5)
        parts = [f"THE TRAGEDY OF PLAY {p}", "ACT I."]
        scene: list[str] = []
        for k in range(speeches):
            if k % 8 == 0:
                scene = rng.sample(cast, rng.choice([2, 3]))
                parts.append(f"SCENE {k // 8 + 1}.")
            speaker = scene[k % len(scene)]
            verse = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
            parts.append(f"{speaker}.\n{verse.capitalize()}.")
        (folder / f"play{p:02d}.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return str(folder / "*.txt")


def sweep_yaml(corpus: str, out: Path, publish: Path) -> str:
    return f"""
model: {{preset: llama-14m, overrides: {{max_position_embeddings: 64}}}}
grid: {{width: [8, 16], depth: [1, 2], head_dim: 8}}
tokens: 4096
tokenizer: {{train: {{vocab_size: 300}}}}
data: {{inputs: ["{corpus}"], text_mode: file, val_fraction: 0.4, seq_len: 32}}
trainer: {{lr: 0.01, micro_batch_size: 4, eval_max_batches: 2, progress: false, plot: false, tensorboard: false,
          device: cpu}}
curve_points: 4
samples: {{max_new_tokens: 2}}
fit: {{n_boot: 50}}
probe: {{items: 20, context_chars: 90, batch_size: 16, reference: "{out}/runs/w16-d2/final", reference_items: 10}}
report: {{title: tiny sweep, publish_dir: "{publish}", name: scaling-tiny}}
threads: 1
output_dir: {out}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("scaling")
    # 24 short plays rather than 10 long ones: the held-out split hashes document ids, which hold the temp path, and
    # with 10 documents at val_fraction 0.4 about 1 path in 170 sent every play to one side
    corpus = write_plays(root / "plays", plays=24, speeches=34)
    config = root / "sweep.yaml"
    config.write_text(sweep_yaml(corpus, root / "out", root / "docs"), encoding="utf-8")
    assert main(["scaling", str(config), "--no-progress"]) == 0
    return root / "out", root / "docs", config


def test_sweep_writes_runs_fits_probe_and_reports(sweep: tuple[Path, Path, Path]) -> None:
    out, docs, _ = sweep
    result = json.loads((out / "scaling.json").read_text(encoding="utf-8"))
    runs = result["runs"]
    assert [r["name"] for r in runs] == ["w8-d1", "w16-d1", "w8-d2", "w16-d2"]
    assert len({r["params"] for r in runs}) == 4
    for r in runs:
        assert r["tokens"] == 32 * 4 * 32  # 32 steps of 4 windows of 32 tokens
        assert r["flops"] == pytest.approx(6 * r["params"] * r["tokens"])
        assert r["eval_loss"] > 0 and len(r["curve"]) >= 4
        p = r["probe"]
        assert p["items"] == 20 and p["chance"] == 0.25 and p["low"] <= p["accuracy"] <= p["high"]
    fit = result["fits"]["N"]
    assert fit["n_points"] == 4 and fit["ci"]["alpha"][0] <= fit["alpha"] <= fit["ci"]["alpha"][1]
    assert "C" in result["fits"] or "C" in result["not_fitted"]
    ref = result["probe_reference"]  # the last run's model as the yardstick: the same items, the same picks
    assert ref["items"] == 10 and ref["low"] <= ref["accuracy"] <= ref["high"]
    items = json.loads((out / "probe_items.json").read_text(encoding="utf-8"))
    assert len(items) == 20 and all(it["options"][it["answer"]] in it["context"] for it in items)
    png = (out / "scaling.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) < 200_000
    md = (docs / "scaling-tiny.md").read_text(encoding="utf-8")
    assert "](scaling-tiny.png)" in md and "| w16-d2 |" in md and "L(N) = E + A / N^alpha" in md
    assert "Reference: the pretrained" in md
    assert (docs / "scaling-tiny.png").read_bytes() == png
    assert (out / "report.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 1


def test_later_runs_reuse_the_first_runs_tokenizer_and_data(sweep: tuple[Path, Path, Path]) -> None:
    out, _, _ = sweep
    first = out / "runs" / "w8-d1"
    assert (first / "tokenizer" / "tokenizer.json").is_file() and (first / "data" / "packed" / "index.json").is_file()
    for name in ("w16-d1", "w8-d2", "w16-d2"):
        run = out / "runs" / name
        recorded = json.loads((run / "pretrain_config.json").read_text(encoding="utf-8"))
        assert Path(recorded["data"]["packed"]) == first / "data"
        assert Path(recorded["tokenizer"]["path"]) == first / "tokenizer"
        assert not (run / "tokenizer").exists() and not (run / "data").exists()


def test_rerun_skips_finished_runs(sweep: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, config = sweep
    before = json.loads((out / "scaling.json").read_text(encoding="utf-8"))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("lmcraft.pipeline.InProcessPipeline._run_stage", no_training)
    after = scaling(load_config(ScalingConfig, config), progress=False)
    assert [r["eval_loss"] for r in after["runs"]] == [r["eval_loss"] for r in before["runs"]]
    assert [r["probe"]["correct"] for r in after["runs"]] == [r["probe"]["correct"] for r in before["runs"]]


BASE = {
    "model": {"preset": "llama-14m"},
    "tokens": 1000,
    "data": {"inputs": ["x.txt"], "seq_len": 16},
    "trainer": {"micro_batch_size": 2},
    "output_dir": "out",
}


def sizes(*names: str) -> list[dict]:
    return [{"name": n, "overrides": {"hidden_size": 16 * (k + 1)}} for k, n in enumerate(names)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "exactly one of sizes"),
        ({"sizes": sizes("a"), "grid": {"width": [8], "depth": [1], "head_dim": 8}}, "exactly one of sizes"),
        ({"sizes": sizes("a", "a")}, "unique"),
        ({"grid": {"width": [12], "depth": [1], "head_dim": 8}}, "not divisible"),
        ({"sizes": sizes("a"), "tokens": [100, 100]}, "distinct"),
        ({"sizes": sizes("a"), "objective": {"name": "mlm"}}, "probe: null"),
        ({"sizes": sizes("a"), "model": {"from": "somewhere"}}, "model.preset"),
        ({"sizes": [{"name": "a b"}]}, "sizes.0.name"),
        ({"sizes": sizes("a"), "fit": {"n_boot": 5}}, "fit.n_boot"),
    ],
)
def test_config_mistakes_are_reported(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(ScalingConfig, {**BASE, **change})


def test_plan_of_a_data_sweep(tmp_path: Path) -> None:
    cfg = validate_config(ScalingConfig, {**BASE, "sizes": sizes("a", "b"), "tokens": [320, 640],
                                           "output_dir": str(tmp_path), "curve_points": 2})
    runs = plan_runs(cfg)
    assert [name for name, _ in runs] == ["a-320", "b-320", "a-640", "b-640"]
    assert [rc.trainer.max_steps for _, rc in runs] == [10, 10, 20, 20]  # tokens / (2 windows * 16 tokens)
    assert [rc.trainer.eval_every for _, rc in runs] == [5, 5, 10, 10]
    first = runs[0][1]
    assert first.data.inputs == ["x.txt"] and first.data.packed is None
    for _, rc in runs[1:]:
        assert rc.data.packed == tmp_path / "runs" / "a-320" / "data" and rc.data.inputs is None
    assert [rc.model.overrides["hidden_size"] for _, rc in runs] == [16, 32, 16, 32]


def test_grid_sizes() -> None:
    grid = GridSection(width=[32, 64], depth=[2], head_dim=16)
    a, b = grid.sizes()
    assert (a.name, b.name) == ("w32-d2", "w64-d2")
    assert b.overrides == {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16,
                           "intermediate_size": 176}
