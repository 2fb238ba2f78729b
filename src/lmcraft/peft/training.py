"""PEFT's training side: one way to prepare a model for training with a method, checkpoint it, and save it.

Every stage that trains (finetune, sft, reward, dpo, ppo) goes through `prepare_for_training`:

- `peft: null` is full fine-tuning: every parameter trains and checkpoints hold the whole state dict.
- Otherwise the method is applied (`lmcraft.peft.apply`) with its config completed by `method_config`: a head other
  than the LM head (a task or reward head) trains as a full copy (`modules_to_save`, as Hugging Face PEFT does for
  sequence classification), and AdaLoRA's `total_step` defaults to the run's optimizer steps.
- `PeftTraining.loss(loss_fn)` adds the method's regulariser R (AdaLoRA's orthogonality penalty) to the training
  loss, logged as `peft_reg`: a micro-batch adds R * num_targets to its summed loss, so that the trainer's division
  by the targets adds exactly R to the mean loss. Evaluation losses stay the task's own.
- `PeftTraining.callbacks()`: AdaLoRA's rank allocator, which scores and prunes singular triplets after each
  optimizer step while the gradients still exist (an optimizer step post-hook).
- `PeftTraining.weights(model)`: checkpoints (`step-N/`, `best/`) of PEFT runs hold exactly the parameters trainable
  when training began (adapters, saved heads, PPO's value head) in `adapter_model.safetensors`, loaded non-strictly
  onto the same frozen base.

`save_final` writes the trained model (an HF folder, or the adapter in the PEFT layout) with its tokenizer, and
`reference_policy` gives the frozen policy preference methods compare against (DPO, PPO).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lmcraft.errors import LmcraftError
from lmcraft.hooks import Callback, WeightsFormat

if TYPE_CHECKING:
    import torch

    from lmcraft.models.model import LanguageModel
    from lmcraft.objectives.base import LossOutput
    from lmcraft.tokenizer.load import Tokenizer

__all__ = ["REGULARIZER_METRIC", "AdaLoraAllocator", "AdapterWeights", "PeftTraining", "ReferencePolicy",
           "fit_head", "is_peft", "method_config", "prepare_for_training", "reference_policy", "save_final", "unwrap"]

REGULARIZER_METRIC = "peft_reg"

LossFn = Callable[[nn.Module, Any], "LossOutput"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def is_peft(model: nn.Module) -> bool:
    from lmcraft.peft import PeftModel

    return isinstance(unwrap(model), PeftModel)


def method_config(peft: dict[str, Any], head: str, total_steps: int) -> dict[str, Any]:
    """The `peft:` block completed for this head and run length (a new dict; the input is not changed)."""
    out = dict(peft)
    if head != "lm":
        saved = list(out.get("modules_to_save") or [])
        out["modules_to_save"] = saved if "head" in saved else [*saved, "head"]
    if out.get("method") == "adalora" and not out.get("total_step"):
        out["total_step"] = total_steps
    return out


class AdaLoraAllocator(Callback):
    """Calls `lmcraft.peft.update_and_allocate(model, step)` after every optimizer update."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handle: Any = None

    def on_train_begin(self, trainer: Any) -> None:
        from lmcraft.peft import update_and_allocate

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            update_and_allocate(self.model, trainer.state.step)

        self.handle = trainer.optimizer.register_step_post_hook(hook)

    def on_train_end(self, trainer: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs and rank pattern of the active AdaLoRA adapter (for exact resume)."""
        return self.model.method_state[self.model.active_adapter].state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.method_state[self.model.active_adapter].load_state_dict(self.model, state)


class AdapterWeights(WeightsFormat):
    """`adapter_model.safetensors` holding the named parameters only; loads non-strictly onto the same model."""

    def __init__(self, names: list[str]) -> None:
        super().__init__("adapter_model.safetensors", trainable_only=True)
        self.names = set(names)

    def select(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k in self.names}


@dataclass
class PeftTraining:
    """A model prepared for training: `model` (a PeftModel, or the model itself for full fine-tuning) and what the
    Trainer needs around it (see the module docstring)."""

    model: nn.Module
    method: str  # "full" or the PEFT method's name

    def loss(self, loss_fn: LossFn) -> LossFn:
        """`loss_fn` plus the method's regulariser in training mode (unchanged when the method has none)."""
        from lmcraft import peft

        if self.method == "full" or peft.regularization_loss(self.model) is None:
            return loss_fn

        def regularized(model: nn.Module, batch: Any) -> LossOutput:
            out = loss_fn(model, batch)
            if model.training:
                reg = peft.regularization_loss(self.model)
                out.loss_sum = out.loss_sum + reg * out.num_targets
                out.metrics = {**out.metrics, REGULARIZER_METRIC: reg.detach()}
            return out

        return regularized

    def callbacks(self) -> list[Callback]:
        """AdaLoRA's rank allocator when the method is AdaLoRA."""
        return [AdaLoraAllocator(self.model)] if self.method == "adalora" else []

    def weights(self, trained: nn.Module | None = None) -> WeightsFormat:
        """The checkpoint format of `trained` (default: `model`; PPO passes its policy-with-value-head): the whole
        state dict for full fine-tuning, else the parameters trainable now."""
        if self.method == "full":
            return WeightsFormat()
        trained = self.model if trained is None else trained
        return AdapterWeights([n for n, p in trained.named_parameters() if p.requires_grad])


def fit_head(model: LanguageModel, num_labels: int, labels: list[str] | None = None) -> None:
    """Give a cls/token_cls head `num_labels` outputs; record `labels` (names in id order) in the config.

    The classifier's output layer is replaced when the checkpoint's has another number of outputs (freshly
    initialised with the model's init: N(0, initializer_range), zero bias); an encoder's pooler is kept. Label names
    go into the config's `id2label`/`label2id`, so a saved model carries them in its config.json."""
    from lmcraft.models.heads import SequenceClassificationHead, TokenClassificationHead

    head = model.head
    if not isinstance(head, SequenceClassificationHead | TokenClassificationHead):
        raise ValueError(f"fit_head needs a cls or token_cls head, the model has {model.head_kind!r}")
    cfg = model.config
    old = head.classifier
    if old.out_features != num_labels:
        new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        model._init_weights(new)
        head.classifier = new
    cfg.num_labels = num_labels
    names = labels if labels else [f"LABEL_{i}" for i in range(num_labels)]
    cfg.extra["id2label"] = {str(i): name for i, name in enumerate(names)}
    cfg.extra["label2id"] = {name: i for i, name in enumerate(names)}


def prepare_for_training(model: nn.Module, peft_cfg: dict[str, Any] | None, head: str, total_steps: int
                         ) -> PeftTraining:
    """Apply the method of `peft_cfg` to `model` (None = full fine-tuning: every parameter trains). `head` is the
    model's head kind ("lm", "cls", "reward", ...); `total_steps` the run's optimizer steps (AdaLoRA's schedule)."""
    if peft_cfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return PeftTraining(model, "full")
    from lmcraft import peft

    return PeftTraining(peft.apply(model, method_config(peft_cfg, head, total_steps)), str(peft_cfg["method"]))


def save_final(model: nn.Module, final: Path, base_source: str, tokenizer: Tokenizer, merged: Path | None = None
               ) -> dict[str, str]:
    """Write the trained model to `final`: an HF folder (full fine-tuning) or the adapter (PEFT layout, naming
    `base_source` as its base), with `tokenizer` either way; with `merged`, also the adapter folded into a full HF
    folder there. Returns the paths written ({"final", "merged"})."""
    from lmcraft import hub, peft

    m = unwrap(model)
    paths = {"final": str(final)}
    if not isinstance(m, peft.PeftModel):
        hub.save_model(m, final)
        tokenizer.save(final)
        return paths
    peft.save_adapter(m, final, base_model_name_or_path=base_source)
    tokenizer.save(final)
    if merged is not None:
        full = peft.merge(m)
        if isinstance(full, peft.PeftModel):
            raise LmcraftError(f"save.merge: a {m.peft_configs[m.active_adapter].method} adapter cannot be merged "
                               f"into the base weights; the adapter is in {final}")
        hub.save_model(full, merged)
        tokenizer.save(merged)
        paths["merged"] = str(merged)
    return paths


class ReferencePolicy:
    """The frozen policy a preference method compares against: `with reference.active(policy) as net:` yields the
    network to call under no-grad in eval mode (training mode is restored afterwards).

    `copy` None: the policy itself with its adapters disabled (PEFT runs: no second copy of the weights);
    else a frozen copy of the start policy (full fine-tuning)."""

    def __init__(self, copy: nn.Module | None = None) -> None:
        if copy is not None:
            copy.eval().requires_grad_(False)
        self.copy = copy

    @contextmanager
    def active(self, policy: nn.Module) -> Iterator[nn.Module]:
        import torch

        net = self.copy if self.copy is not None else unwrap(policy)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                if self.copy is not None:
                    yield net
                else:
                    with net.disable_adapters():
                        yield net
        finally:
            net.train(was_training)


def reference_policy(model: nn.Module) -> ReferencePolicy:
    """The one rule: a PEFT model's reference is itself with adapters disabled; any other model's is a frozen
    deep copy of it as it is now (call this before training starts)."""
    return ReferencePolicy() if is_peft(model) else ReferencePolicy(copy.deepcopy(unwrap(model)))
