"""Tokenizers: load HF `tokenizer.json`, render chat templates (load.py, chat.py), train new ones (train.py)."""
