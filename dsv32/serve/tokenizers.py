"""The tokenizer of a model directory: its Hugging Face tokenizer when it has one, else dsv32's byte tokenizer.

    tok = load_tokenizer("runs/demo/final")   # tokenizer.json / tokenizer_config.json -> HFTokenizer
    ids = tok.encode(text); tok.decode(ids); tok.eos_id; tok.vocab_size

Both expose the same small interface the server, the chat REPL and `dsv32.data.chat` use. Text given to
`encode` is a rendered chat template: it already carries BOS and the special tokens as strings, so nothing
is added around it.
"""

from __future__ import annotations

from pathlib import Path

from ..data.tokenizer import ByteTokenizer

HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFTokenizer:
    """A `transformers` tokenizer behind the byte tokenizer's interface."""

    def __init__(self, tok, where: str):
        if tok.eos_token_id is None:
            raise ValueError(f"{where}: the tokenizer has no eos_token; set \"eos_token\" in tokenizer_config.json")
        self.tok = tok

    @property
    def eos_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def bos_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)


def load_tokenizer(model_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """HFTokenizer when `model_dir` holds a Hugging Face tokenizer, else ByteTokenizer (what dsv32 trains with)."""
    path = Path(model_dir)
    if not any((path / f).exists() for f in HF_FILES):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: could not load its Hugging Face tokenizer ({e}); fix or remove "
                         f"{' / '.join(HF_FILES)} to fall back to dsv32's byte tokenizer") from e
    return HFTokenizer(tok, str(path))


class TextStream:
    """Incremental detokenisation of one generation: `push(token)` returns the text that became final (never
    half a UTF-8 character, never a possible start of a stop string, nothing from a stop string on);
    `finish()` returns the rest. Only a short window of ids is decoded per token (vLLM's offsets scheme)."""

    def __init__(self, decode, stops: tuple[str, ...] = (), skip_special: bool = False):
        self.decode, self.stops, self.skip = decode, stops, skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to text already taken; read: end of final text
        self.pending = ""  # final text not released yet (a possible stop-string start)
        self.text = ""  # everything released
        self.stopped = False

    def _advance(self, force: bool) -> None:
        new = self.decode(self.ids[self.prefix:], skip_special=self.skip)
        if new.endswith("\ufffd") and not force:
            return  # a multi-byte character is not complete yet
        prev = self.decode(self.ids[self.prefix:self.read], skip_special=self.skip)
        self.pending += new[len(prev):]
        self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        hits = [self.pending.index(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
        else:
            hold = 0 if final else max([k for s in self.stops for k in range(1, len(s))
                                        if self.pending.endswith(s[:k])], default=0)
            cut = len(self.pending) - hold
            out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stopped:
            return ""
        self._advance(force=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._advance(force=True)
        return self._release(final=True)
