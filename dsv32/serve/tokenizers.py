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
