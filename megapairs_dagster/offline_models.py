"""Tokenizers and small text-model configs built offline (the hub is unreachable where the
demo and the tests run): a byte-level BPE trained in memory and a 2-layer Llama config.

Only tokenizers and transformers are imported, so vLLM's own environment (which has neither
pandas nor peft) can build the same models as the project's.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
PATCH_SIZE = 8  # the small vision towers' patch side


def byte_level_tokenizer(
    corpus: Sequence[str], *, chat_template: str | None = None, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` in memory, with bos/eos/pad/<image>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, chat_template=chat_template,
    )


def llama_text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A 2-layer Llama of width 64. A wide initialisation gives peaked logits, so greedy ties
    (which float noise from padding could break either way) do not occur."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
