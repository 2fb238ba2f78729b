"""Prompting: templates, few-shot selection, strategies (zero-shot, instruction, few-shot, chain-of-thought,
self-consistency, least-to-most, multiple choice, perplexity) and YAML tasks, over the small `LM` protocol.

    from lmcraft.prompting import ScriptedLM, load_task
    from lmcraft.prompting.model_lm import ModelLM          # the real model (imports torch)
    from lmcraft.evaluate import evaluate_task
    result = evaluate_task(ModelLM.load("smollm2-135m-instruct"), load_task("gsm_symbolic"), chat=True, limit=20)
"""

from lmcraft.prompting.answers import AnswerSpec
from lmcraft.prompting.lm import LM, GenSettings
from lmcraft.prompting.scripted import ScriptedLM
from lmcraft.prompting.strategies import (
    Context,
    FewShot,
    FewShotCoT,
    Instruction,
    LeastToMost,
    MultipleChoice,
    Perplexity,
    Prediction,
    Sampling,
    SelfConsistency,
    ZeroShot,
    ZeroShotCoT,
    majority_vote,
)
from lmcraft.prompting.tasks import Task, TaskConfig, builtin_tasks, load_task
from lmcraft.prompting.templates import Prompt, PromptTemplate, Shots

__all__ = [
    "LM",
    "AnswerSpec",
    "Context",
    "FewShot",
    "FewShotCoT",
    "GenSettings",
    "Instruction",
    "LeastToMost",
    "MultipleChoice",
    "Perplexity",
    "Prediction",
    "Prompt",
    "PromptTemplate",
    "Sampling",
    "ScriptedLM",
    "SelfConsistency",
    "Shots",
    "Task",
    "TaskConfig",
    "ZeroShot",
    "ZeroShotCoT",
    "builtin_tasks",
    "load_task",
    "majority_vote",
]
