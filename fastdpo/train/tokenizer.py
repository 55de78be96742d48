"""A small BPE tokenizer trained on the preference data at first use (the default run downloads nothing).

It behaves as a Llama tokenizer does for TRL's tokenization: BOS is added when text is encoded, EOS is a special
token that TRL appends to plain-text completions.
"""
from __future__ import annotations

import hashlib
import json
import os

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# For conversational data: BOS, then "role: content" lines, each message closed by EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
VERSION = "2"    # part of the cache name: version 2 adds BOS when encoding


def _texts(pairs):
    for row in pairs:
        for key in ("prompt", "chosen", "rejected"):
            yield row[key] if isinstance(row[key], str) else json.dumps(row[key])


def trained_tokenizer(pairs, vocab_size: int, cache_dir: str):
    """PreTrainedTokenizerFast trained on ``pairs`` (cached under cache_dir by the data's hash)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256("\n".join(_texts(pairs)).encode() + f"{vocab_size}/{VERSION}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-{digest}.json")
    if not os.path.exists(path):
        tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_texts(pairs), trainer)
        bos = SPECIALS["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path, **SPECIALS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_resumable(tokenizer, checkpoint: str) -> None:
    """--resume of a demo run: the tokenizer is trained on the data, so data that changed since the checkpoint gives
    another vocabulary, and the checkpoint's embedding would not fit the model built for it. Refuse in one line."""
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError):
        return          # a LoRA checkpoint (no embedding in it), or none: loading it says what is wrong
    if vocab != len(tokenizer):
        raise ValueError(f"--resume: the demo model's tokenizer is trained on --dataset's rows, and they changed since "
                         f"{checkpoint!r} was written (a vocabulary of {len(tokenizer)} tokens now, {vocab} then); "
                         "resume with the data the run started with, or start a new run")
