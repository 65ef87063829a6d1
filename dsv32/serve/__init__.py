"""Serving: the generation engine (token in, token out), sampling, an OpenAI-compatible server and a
terminal chat.

    from dsv32.serve import Engine, SamplingParams
    engine = Engine(model, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    out = engine.generate([prompt_ids], SamplingParams(temperature=0.7, top_p=0.9))[0]
"""

from .engine import Completion, Engine, StepEvent
from .sampling import KeptSets, SamplingParams, logprobs_over_kept, process_logits, sample
from .tokenizers import TextStream, load_tokenizer

__all__ = ["Completion", "Engine", "KeptSets", "SamplingParams", "StepEvent", "TextStream", "load_tokenizer",
           "logprobs_over_kept", "process_logits", "sample"]
