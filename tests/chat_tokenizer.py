"""A local tokenizer with a chat template, for the data.template: chat tests (nothing is downloaded):
the byte-level BPE tiny recipes train, plus ChatML's two special tokens and a small Jinja template."""

from __future__ import annotations

from pathlib import Path

END_OF_TURN = "<|im_end|>"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer(out_dir: Path, vocab_size: int = 512, template: str | None = CHATML):
    """Train the BPE on the synthetic tasks, add <|im_start|> / <|im_end|>, set `template`, save."""
    from bdctl.data.synthetic import synthetic_corpus, synthetic_instructions
    from bdctl.models import train_tokenizer
    from bdctl.recipe.schema import TokenizerTraining

    rows = synthetic_instructions(400, seed=7)
    texts = [r["instruction"] + "\n\n" + r["input"] + "\n" + r["output"] for r in rows] + synthetic_corpus(100, seed=7)
    tokenizer = train_tokenizer(texts, TokenizerTraining(vocab_size=vocab_size), out_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END_OF_TURN]})
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    return tokenizer
