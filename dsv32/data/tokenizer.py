"""Byte-level tokenizer with DeepSeek-V3.2's chat special tokens.

Ids 0..255 are the UTF-8 bytes; the special tokens follow from 256 in `SPECIALS` order, so the vocabulary
(272) fits the `tiny` preset's 512. Special strings written in the text are recognised (longest match
first), so a chat template can be rendered as a string and encoded in one call.

    tok = ByteTokenizer()
    ids = tok.encode("<｜User｜>hi<｜Assistant｜>", add_bos=True)   # [256, 258, 104, 105, 259]
    tok.decode(ids)                                                  # the same string, with the bos
"""

from __future__ import annotations

import re

# The strings are DeepSeek-V3.2's (fullwidth bars ｜ U+FF5C and ▁ U+2581, as in its tokenizer_config.json).
SPECIALS = (
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<pad>",
)
BOS, EOS, USER, ASSISTANT = SPECIALS[0], SPECIALS[1], SPECIALS[2], SPECIALS[3]
THINK_BEGIN, THINK_END, PAD = SPECIALS[4], SPECIALS[5], SPECIALS[15]
BOS_ID, EOS_ID, PAD_ID = 256 + SPECIALS.index(BOS), 256 + SPECIALS.index(EOS), 256 + SPECIALS.index(PAD)


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus the special tokens (ids 256..271)."""

    def __init__(self):
        self.special_to_id = {s: 256 + i for i, s in enumerate(SPECIALS)}
        self.id_to_special = {i: s for s, i in self.special_to_id.items()}
        # Longest alternative first so that no special is cut short by a prefix of another.
        alts = sorted(SPECIALS, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    @property
    def bos_id(self) -> int:
        return self.special_to_id[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_to_id[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_to_id[PAD]

    def token_id(self, special: str) -> int:
        if special not in self.special_to_id:
            raise ValueError(f"tokenizer.py: {special!r} is not a special token; known: {', '.join(SPECIALS)}")
        return self.special_to_id[special]

    def is_special(self, token_id: int) -> bool:
        return token_id >= 256

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # odd pieces are the captured special strings
                ids.append(self.special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Inverse of `encode`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        out, buf = [], bytearray()
        for t in (int(t) for t in ids):
            if 0 <= t < 256:
                buf.append(t)
            elif t in self.id_to_special:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special:
                    out.append(self.id_to_special[t])
            else:
                raise ValueError(f"tokenizer.py: token id {t} is outside the vocabulary [0, {self.vocab_size}); "
                                 "was it produced by a model with a larger vocab? mask logits to vocab_size")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
