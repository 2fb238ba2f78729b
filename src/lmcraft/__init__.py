"""lmcraft: raw text -> corpus -> tokenizer -> pre-training -> fine-tuning/PEFT -> alignment -> evaluation."""

__version__ = "0.1.0"
