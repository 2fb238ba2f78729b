"""Fine-tuning parts: LLRD, freezing, gradual unfreezing, task losses and metrics, data reading and alignment."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.config import validate_config
from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.errors import ConfigError, InputFileError
from lmcraft.finetune.config import DataConfig, DataSource, FinetuneConfig
from lmcraft.finetune.data import Collator, build_task_data, read_source, split_records
from lmcraft.finetune.emails import email_text
from lmcraft.finetune.layers import (
    GradualUnfreezing,
    freeze_parameters,
    is_head,
    layer_of,
    transformer_param_groups,
    unfrozen_depths,
)
from lmcraft.finetune.tasks import (
    ClassificationTask,
    RegressionTask,
    TokenClassificationTask,
    make_task,
    spearman,
)
from lmcraft.models import ModelConfig, preset
from lmcraft.tokenizer.load import load_tokenizer
from lmcraft.train import Callback, Trainer, TrainerConfig
from test_finetune_support import quick_trainer, sentiment_rows, tiny_model_folder, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bert_config(num_layers: int = 3) -> ModelConfig:
    return preset("bert-tiny", vocab_size=50, hidden_size=16, num_layers=num_layers, num_heads=2, intermediate_size=32,
                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)


LLAMA = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32)


# ---------------------------------------------------------------------------------------------- layers
def test_layer_of_and_is_head_cover_plain_and_peft_names() -> None:
    assert layer_of("model.embed_tokens.weight") == 0
    assert layer_of("model.embed_norm.bias") == 0
    assert layer_of("model.layers.0.self_attn.q_proj.weight") == 1
    assert layer_of("base_model.model.layers.11.mlp.down_proj.lora_A.default.weight") == 12
    assert layer_of("base_model.model.embed_positions.weight") == 0
    assert layer_of("model.norm.weight") is None and layer_of("head.classifier.weight") is None
    assert layer_of("providers.default.embedding.weight") is None
    assert is_head("head.pooler.weight") and is_head("base_model.head.modules_to_save.default.classifier.bias")
    assert not is_head("model.layers.0.mlp.up_proj.weight")


def test_llrd_learning_rates_by_hand(tiny_model) -> None:
    model = tiny_model(bert_config(num_layers=3), "cls")
    groups = transformer_param_groups(model, lr=1.0, weight_decay=0.01, num_layers=3, layer_lr_decay=0.5, head_lr=7.0)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # block i of L=3 trains at 0.5 ** (3 - 1 - i); embeddings at 0.5 ** 3; the head at head_lr
    assert lr_of["model.layers.2.self_attn.q_proj.weight"] == 1.0
    assert lr_of["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert lr_of["model.layers.0.attn_norm.weight"] == 0.25
    assert lr_of["model.embed_tokens.weight"] == 0.125
    assert lr_of["model.embed_norm.weight"] == 0.125
    assert lr_of["head.classifier.weight"] == 7.0 and lr_of["head.pooler.bias"] == 7.0
    # no weight decay on biases, LayerNorm weights and embedding tables; decay on matrices
    assert wd_of["model.layers.0.self_attn.q_proj.bias"] == 0.0
    assert wd_of["model.layers.0.attn_norm.weight"] == 0.0
    assert wd_of["model.embed_tokens.weight"] == 0.0
    assert wd_of["model.layers.0.self_attn.q_proj.weight"] == 0.01
    assert len(lr_of) == sum(1 for _ in model.parameters())


def test_llrd_applies_to_peft_adapter_parameters(tiny_model) -> None:
    from lmcraft import peft

    model = peft.apply(tiny_model(bert_config(num_layers=2), "cls"),
                       {"method": "lora", "r": 2, "modules_to_save": ["head"]})
    groups = transformer_param_groups(model, lr=1.0, weight_decay=0.0, num_layers=2, layer_lr_decay=0.1, head_lr=3.0)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of["base_model.model.layers.1.self_attn.q_proj.lora_A.default.weight"] == 1.0
    assert lr_of["base_model.model.layers.0.self_attn.v_proj.lora_B.default.weight"] == pytest.approx(0.1)
    assert lr_of["base_model.head.modules_to_save.default.classifier.weight"] == 3.0
    assert all(p.requires_grad for g in groups for p in g["params"])


def _batch(n: int = 4, t: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(4, 50, (n, t), generator=g),
            "attention_mask": torch.ones(n, t, dtype=torch.long), "labels": torch.randint(0, 2, (n,), generator=g)}


def _trainer(model: nn.Module, output_dir, steps: int, callbacks=(), lr: float = 1e-2) -> Trainer:
    task = ClassificationTask(labels=["a", "b"])
    data = [dict(input_ids=list(range(4, 10)), label=i % 2) for i in range(16)]
    cfg = TrainerConfig(**quick_trainer(max_steps=steps, micro_batch_size=4, lr=lr, max_grad_norm=None))
    return Trainer(model, lambda m, b: task.forward(m, b)[0], data, config=cfg, output_dir=output_dir,
                   collate_fn=Collator("cls", 0), callbacks=callbacks)


def test_frozen_bottom_layers_get_no_gradients_and_keep_their_weights(run_folder, tiny_model) -> None:
    model = tiny_model(bert_config(num_layers=3), "cls")
    frozen = freeze_parameters(model, embeddings=True, bottom_layers=2)
    assert frozen and all(layer_of(n) in (0, 1, 2) for n in frozen)
    assert not any(layer_of(n) == 3 for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(**{k: v for k, v in _batch().items() if k != "labels"})
    F.cross_entropy(out.logits, _batch()["labels"]).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen), name
    model.zero_grad(set_to_none=True)
    _trainer(model, run_folder, steps=3).train(resume_from=None)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name in frozen), name


def test_unfrozen_depths_schedule() -> None:
    assert unfrozen_depths(0, 3) == set()
    assert unfrozen_depths(1, 3) == {3}
    assert unfrozen_depths(2, 3) == {3, 2}
    assert unfrozen_depths(3, 3) == {3, 2, 1}
    assert unfrozen_depths(4, 3) == {3, 2, 1, 0}
    assert unfrozen_depths(9, 3) == {3, 2, 1, 0}


def test_gradual_unfreezing_trains_top_down_every_k_steps(run_folder, tiny_model) -> None:
    model = tiny_model(bert_config(num_layers=2), "cls")
    freeze_parameters(model, embeddings=True)  # frozen for good: never unfrozen by the schedule
    history: list[dict[int | None, bool]] = []

    class Spy(GradualUnfreezing):
        def on_step_begin(self, trainer) -> None:
            super().on_step_begin(trainer)
            seen: dict[int | None, bool] = {}
            for name, p in model.named_parameters():
                seen[layer_of(name)] = seen.get(layer_of(name), False) or p.requires_grad
            history.append(seen)

    snapshots = []

    class Weights(Callback):  # records the weights after each step
        def on_step_end(self, trainer, metrics) -> None:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    spy = Spy(model, num_layers=2, every_steps=2)
    _trainer(model, run_folder, steps=8, callbacks=[spy, Weights()]).train(resume_from=None)
    # steps 0-1: head only; 2-3: + block 1 (depth 2); 4-5: + block 0; 6-7: + embeddings, but those are frozen
    expected = [{None: True, 2: False, 1: False, 0: False}] * 2 + [{None: True, 2: True, 1: False, 0: False}] * 2 \
        + [{None: True, 2: True, 1: True, 0: False}] * 4
    assert history == expected
    top, bottom = "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(snapshots[0][top], snapshots[1][top])  # block 1 still waits after step 2
    assert not torch.equal(snapshots[1][top], snapshots[2][top])  # ...and trains in step 3
    assert torch.equal(snapshots[2][bottom], snapshots[3][bottom])
    assert not torch.equal(snapshots[3][bottom], snapshots[4][bottom])
    assert torch.equal(snapshots[0]["model.embed_tokens.weight"], snapshots[-1]["model.embed_tokens.weight"])


def test_gradual_unfreezing_starts_with_the_top_block_when_no_head_trains(tiny_model) -> None:
    from lmcraft import peft

    lm = tiny_model(preset("llama-14m", **LLAMA), "lm")
    model = peft.apply(lm, {"method": "lora", "r": 2})
    schedule = GradualUnfreezing(model, num_layers=2, every_steps=3)
    schedule.apply(0)
    trains = {layer_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {2}
    schedule.apply(3)
    assert {layer_of(n) for n, p in model.named_parameters() if p.requires_grad} == {1, 2}


# ---------------------------------------------------------------------------------------------- losses
class FixedLogits(nn.Module):
    """A stand-in model whose logits are given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.training = True

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: ANN001, ANN201
        return type("Out", (), {"logits": self.logits})()


def test_classification_loss_is_summed_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    out, _ = ClassificationTask(labels=["a", "b", "c"]).forward(FixedLogits(logits), batch)
    by_hand = -(torch.log_softmax(logits[0], -1)[0] + torch.log_softmax(logits[1], -1)[2])
    assert out.loss_sum.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert out.num_targets == 2 and out.metrics["accuracy"].item() == 0.5 and int(out.num_tokens) == 6


def test_regression_loss_is_summed_squared_error() -> None:
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "labels": torch.tensor([1.0, 0.0, 2.0])}
    out, pred = RegressionTask().forward(FixedLogits(torch.tensor([[1.5], [0.0], [1.0]])), batch)
    assert out.loss_sum.item() == pytest.approx(0.25 + 0.0 + 1.0)
    assert out.num_targets == 3 and pred.shape == (3,)


def test_token_classification_loss_skips_ignored_positions() -> None:
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": labels}
    task = TokenClassificationTask(labels=["O", "B-PER", "I-PER"])
    out, _ = task.forward(FixedLogits(logits), batch)
    lp = torch.log_softmax(logits, -1)
    assert out.loss_sum.item() == pytest.approx(-(lp[0, 1, 1] + lp[0, 2, 2] + lp[1, 1, 0]).item(), rel=1e-6)
    assert out.num_targets == 3
    pred, gold = task.predictions(logits, batch)
    assert gold == [["B-PER", "I-PER"], ["O"]] and [len(p) for p in pred] == [2, 1]


def test_task_metrics() -> None:
    cls = ClassificationTask(labels=["neg", "pos"]).metrics([1, 1, 0, 0], [1, 0, 0, 0])
    assert cls["accuracy"] == 0.75 and cls["f1"] == pytest.approx(2 / 3) and "mcc" in cls and "f1_macro" in cls
    ner = TokenClassificationTask(labels=["O", "B-PER", "I-PER"]).metrics(
        [["B-PER", "I-PER", "O"], ["B-PER"]], [["B-PER", "I-PER", "O"], ["O"]])
    assert ner["entity_precision"] == 0.5 and ner["entity_recall"] == 1.0 and ner["token_accuracy"] == 0.75
    pos = TokenClassificationTask(labels=["NOUN", "VERB"])
    assert pos.headline() == ("token_accuracy", "max") and "entity_f1" not in pos.metrics([["NOUN"]], [["NOUN"]])
    reg = RegressionTask().metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert reg["mse"] == pytest.approx(4 / 3) and reg["spearman"] == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]).numpy(), torch.tensor([3.0, 3.0, 1.0]).numpy()) == pytest.approx(-1)
    assert make_task("clm", []).headline() == ("ppl", "min")


# ------------------------------------------------------------------------------------------------ data
def test_readers_and_errors_name_file_and_line(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("text,label\nhello there,pos\n\"multi\nline\",neg\n")
    recs = read_source(DataSource(path=str(tmp_path / "a.csv")))
    assert [r.fields["label"] for r in recs] == ["pos", "neg"] and recs[1].where == "line 4"
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n\n{"text": "y"\n')
    with pytest.raises(InputFileError, match=r"b.jsonl, line 3"):
        read_source(DataSource(path=str(tmp_path / "b.jsonl")))
    (tmp_path / "c.conll").write_text("-DOCSTART- O\n\nAlice B-PER\nSmith I-PER\nran O\n\nBob B-PER\n")
    recs = read_source(DataSource(path=str(tmp_path / "c.conll")))
    assert [r.fields["tags"] for r in recs] == [["B-PER", "I-PER", "O"], ["B-PER"]] and recs[0].where == "line 3"
    for label, texts in {"neg": ["bad", "awful"], "pos": ["good"]}.items():
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i, t in enumerate(texts):
            (tmp_path / "folder" / label / f"{i}.txt").write_text(t)
    recs = read_source(DataSource(path=str(tmp_path / "folder"), format="folder"))
    assert [(r.fields["text"], r.fields["label"]) for r in recs] == [("bad", "neg"), ("awful", "neg"), ("good", "pos")]


def test_classification_data_labels_split_and_errors(tmp_path, word_tokenizer) -> None:
    tok = word_tokenizer(encoder=True)
    rows = [{"text": "great movie", "group": "g1"}, {"text": "awful plot", "group": "b1"},
            {"text": "nice", "group": "g2"}, {"text": "sad sad sad sad sad sad sad sad", "group": "b1"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=DataSource(path=str(path), label_field="group"), validation_fraction=0.25, max_length=5,
                     label_map={"g1": "good", "g2": "good", "b1": "bad"})
    data = build_task_data(cfg, "cls", tok)
    assert data.labels == ["bad", "good"] and len(data.train) == 3 and len(data.validation) == 1
    assert data.truncated == 1 and max(len(e["input_ids"]) for e in data.train + data.validation) == 5
    long = next(e for e in data.train + data.validation if len(e["input_ids"]) == 5)
    assert long["input_ids"][0] == tok.token_to_id("[CLS]") and long["input_ids"][-1] == tok.token_to_id("[SEP]")
    bad = write_jsonl(tmp_path / "e.jsonl", [*rows, {"text": "x", "group": "other"}])
    with pytest.raises(InputFileError, match=r"e.jsonl, line 5: expected a label among"):
        build_task_data(cfg.model_copy(update={"train": DataSource(path=str(bad), label_field="group"),
                                               "labels": ["bad", "good"]}), "cls", tok)
    train, held = split_records(read_source(cfg.train), 0.5, seed=3)
    assert len(train) == 2 and len(held) == 2 and {r.where for r in train} | {r.where for r in held} == {
        f"line {i}" for i in range(1, 5)}


def test_token_data_labels_only_the_first_subtoken(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "ali": 4, "##ce": 5, "ran": 6}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["alice", "ran"], "tags": ["B-PER", "O"]}] * 2)
    data = build_task_data(DataConfig(train=DataSource(path=str(path))), "token_cls", load_tokenizer(tmp_path / "tok"))
    ex = data.train[0]
    assert data.labels == ["B-PER", "O"]
    assert ex["input_ids"] == [2, 4, 5, 6, 3]
    assert ex["labels"] == [IGNORE_INDEX, 0, IGNORE_INDEX, 1, IGNORE_INDEX]
    batch = Collator("token_cls", 0)([ex, {"input_ids": [2, 6, 3], "labels": [IGNORE_INDEX, 1, IGNORE_INDEX]}])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0] and batch["input_ids"][1, 3:].tolist() == [0, 0]


def test_clm_data_packs_documents_with_eos_into_blocks(tmp_path, word_tokenizer) -> None:
    tok = word_tokenizer(encoder=False)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "great movie"}, {"text": "the plot was nice"}] * 4)
    data = build_task_data(DataConfig(train=DataSource(path=str(path)), max_length=4, validation_fraction=0.25),
                           "clm", tok)
    eos = tok.eos_token_id
    assert all(len(e["input_ids"]) == 4 for e in data.train + data.validation)
    assert sum(e["input_ids"].count(eos) for e in data.train) >= 2
    assert Collator("clm", 0)(data.train[:2])["labels"].tolist() == [e["input_ids"] for e in data.train[:2]]


def test_email_text_keeps_subject_and_body() -> None:
    raw = ("From: a@b.c\nReceived: from relay.example\nSubject: Cheap meds\nContent-Type: text/html\n\n"
           "<html><body><p>Buy <b>now</b></p><script>x()</script></body></html>\n")
    assert email_text(raw) == "Subject: Cheap meds Buy now"
    plain = "Subject: hi\nContent-Type: text/plain; charset=unknown-8bit\n\nsee   you\n"
    assert email_text(plain) == "Subject: hi see you"
    assert email_text("no headers here\n\nat all") == "no headers here at all"


def test_config_errors_name_the_key(tmp_path) -> None:
    base = {"task": "cls", "model": "x", "data": {"train": {"path": "x"}}}
    with pytest.raises(ConfigError, match="peft"):
        validate_config(FinetuneConfig, {**base, "peft": {"method": "lorra"}})
    with pytest.raises(ConfigError, match="labels"):
        validate_config(FinetuneConfig, {**base, "task": "clm", "data": {"train": {"path": "x"}, "labels": ["a"]}})
    with pytest.raises(ConfigError, match="bottom_layer"):
        validate_config(FinetuneConfig, {**base, "freeze": {"bottom_layer": 2}})


def test_toy_classification_learns(tmp_path) -> None:
    """Full fine-tuning of a 2-layer encoder on the toy sentiment task reaches high validation accuracy."""
    from lmcraft.finetune.runner import run_finetune

    folder = tiny_model_folder(tmp_path, "bert")
    path = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(240))
    cfg = validate_config(FinetuneConfig, {
        "task": "cls", "model": str(folder), "output_dir": str(tmp_path / "out"), "threads": 1,
        "data": {"train": {"path": str(path)}, "max_length": 24, "validation_fraction": 0.2},
        "trainer": quick_trainer(max_steps=60, lr=3e-3, micro_batch_size=16, eval_every=30, warmup_steps=5),
        "layer_lr_decay": 0.9, "head_lr": 5e-3})
    results = run_finetune(cfg)
    assert results["validation"]["accuracy"] > 0.85, results["validation"]
    assert results["metric"] == "f1_macro" and math.isfinite(results["metric_value"])


@pytest.mark.parametrize("train_weight", [False, True])
def test_chunked_lm_loss_matches_full_logits(train_weight: bool) -> None:
    from lmcraft.objectives.lm_head import chunked_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=train_weight)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, 3] = labels[1, 6] = IGNORE_INDEX
    loss, count = chunked_lm_loss(hidden, weight, labels, rows=4)
    (2.5 * loss).backward()
    got = (hidden.grad.clone(), weight.grad.clone() if train_weight else None)
    hidden.grad = None
    weight.grad = None
    ref = F.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    (2.5 * ref).backward()
    assert count == 10 and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    if train_weight:
        assert torch.allclose(got[1], weight.grad, atol=1e-6)


def test_causal_lm_task_fused_and_plain_agree_on_a_model(tiny_model) -> None:
    from lmcraft.finetune.tasks import CausalLMTask

    model = tiny_model(preset("llama-14m", **LLAMA), "lm")
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[1, 6:] = IGNORE_INDEX
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        out, _ = CausalLMTask(fused=fused).forward(model, batch)
        out.loss_sum.backward()
        results.append((out.loss_sum.item(), out.num_targets, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == 13 and l1 == pytest.approx(l2, rel=1e-5)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5), name


def test_clm_long_documents_are_packed_not_truncated(tmp_path, word_tokenizer) -> None:
    tok = word_tokenizer(encoder=False)
    words = ("great movie the plot was nice and sad " * 10).split()
    (tmp_path / "a.txt").write_text(" ".join(words))
    (tmp_path / "b.txt").write_text(" ".join(words[:20]))
    cfg = DataConfig(train=DataSource(path=str(tmp_path / "a.txt")),
                     validation=DataSource(path=str(tmp_path / "b.txt")), max_length=8, max_train_examples=5)
    data = build_task_data(cfg, "clm", tok)
    assert len(data.train) == 5 and len(data.validation) == 21 // 8 and data.truncated == 0


def test_qlora_training_keeps_no_dense_weights_for_backward() -> None:
    """NF4 layers dequantise again in backward: autograd saves no (out, in) weight (the QLoRA memory saving)."""
    from lmcraft.peft.nf4 import NF4Linear

    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    layer = NF4Linear(dense)
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    assert (48, 64) not in saved and (64, 48) not in saved
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantize(), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
