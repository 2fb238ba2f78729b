"""The parts of pre-training that `lmcraft pretrain` (stages/pretrain.py) wires together.

    config     the stage's config: model, objective, tokenizer, data, trainer and samples sections
    resume     one folder = one run: a rerun resumes it, so only trainer settings may change
    inputs     the tokenizer (given, trained or found) and the packed training/evaluation documents
    examples   windows of the packed stream, or sentence pairs, of one split
    model      the model config: a preset sized to the tokenizer, or an HF folder's
    report     OUT/final/ (the objective's kept model), samples, the run summary

Elsewhere on their own floors: the objectives (lmcraft.objectives: losses, token-id needs, the kept model,
masked-token accuracy), the batch makers (lmcraft.data.batches), weight transfer for continued pre-training
(lmcraft.hub.transfer), tokenizer training (lmcraft.tokenizer.train, lmcraft.data.tokenizer_training) and the
loop (lmcraft.train.Trainer). Importing this package does not import torch.
"""

from lmcraft.pretrain.config import (
    DataSection,
    ModelSection,
    ObjectiveSection,
    PretrainConfig,
    SamplesSection,
    TokenizerSection,
    TokenizerTraining,
)

__all__ = ["DataSection", "ModelSection", "ObjectiveSection", "PretrainConfig", "SamplesSection",
           "TokenizerSection", "TokenizerTraining"]
