"""Offline byte-level tokenizer for tiny random Mamba models.

The tokenizer maps every byte to the token whose id equals the byte value
(ids 0..255) and adds one special token ``<|endoftext|>`` (id 256) used as
eos/bos/unk/pad. It needs no download and round-trips any unicode string.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 257
"""Vocabulary size of :func:`byte_tokenizer` (256 bytes + ``<|endoftext|>``)."""

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 256
BYTE_TOKENIZER_NAME = "sensitivity/byte-level"


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible byte -> printable unicode character mapping.

    Returns:
        Dict from each byte value 0..255 to a distinct single-character string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the deterministic byte-level tokenizer (offline).

    Token id ``b`` (0..255) is the byte ``b``; id 256 is ``<|endoftext|>``,
    which serves as eos, bos, unk and pad token.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len(tokenizer) == BYTE_VOCAB_SIZE``.
    """
    mapping = bytes_to_unicode()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    if set(mapping.values()) != alphabet:  # guards against a tokenizers change
        raise RuntimeError("GPT-2 bytes_to_unicode mapping differs from ByteLevel.alphabet()")
    vocab = {char: byte for byte, char in mapping.items()}  # id == byte value
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
        name_or_path=BYTE_TOKENIZER_NAME,
    )
    if len(tokenizer) != BYTE_VOCAB_SIZE or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(f"byte tokenizer has {len(tokenizer)} tokens, expected {BYTE_VOCAB_SIZE}")
    logger.debug("built byte tokenizer with %d tokens", len(tokenizer))
    return tokenizer
