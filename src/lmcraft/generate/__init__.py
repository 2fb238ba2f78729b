"""Text generation: KV-cached decoding, sampling, stop rules, streaming.

    from lmcraft.generate import GenerationConfig, generate, generate_text
    result = generate(model, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=32))   # token ids
    result = generate_text(model, tokenizer, "What is 2+2?", chat=True)                  # result.texts
"""

from lmcraft.generate.core import (
    Generation,
    GenerationConfig,
    GenerationError,
    GenerationResult,
    generate,
    left_pad,
)
from lmcraft.generate.fast_decode import fast_decoding
from lmcraft.generate.sampling import (
    TokenChooser,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from lmcraft.generate.streaming import Streamer, TextStreamer, TextTracker, decode_continuation, encode_text
from lmcraft.generate.text import chat_messages, encode_prompts, generate_text, render_chat, stop_token_ids

__all__ = [
    "Generation",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "Streamer",
    "TextStreamer",
    "TextTracker",
    "TokenChooser",
    "apply_repetition_penalty",
    "chat_messages",
    "decode_continuation",
    "encode_prompts",
    "encode_text",
    "fast_decoding",
    "generate",
    "generate_text",
    "left_pad",
    "min_p_filter",
    "render_chat",
    "stop_token_ids",
    "top_k_filter",
    "top_p_filter",
]
