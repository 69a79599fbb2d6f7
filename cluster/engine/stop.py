"""Text of one completion as it grows: incremental detokenization and stop strings.

  push(token) -> (new text to emit, the stop string that ended it or None)
  flush()     -> whatever was held back, once the sequence has finished

While stop strings are set, the last `max_stop_len - 1` characters are held
back (they might be the start of a stop string); when one matches, the text
is cut before it (or after it, with include_stop_str_in_output) and nothing
past the cut is ever emitted.
"""
from __future__ import annotations

from cluster.types import SamplingParams


class TextState:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.text = ""
        self.num_emitted = 0
        self.stopped = False
        self.detok = None
        if tokenizer is not None:
            from cluster.models.tokenizer import IncrementalDetokenizer

            self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens)
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token_id: int) -> tuple[str, str | None]:
        if self.detok is None or self.stopped:
            return "", None
        start = len(self.text)
        self.text += self.detok.push([token_id])
        stop = self._find_stop(max(0, start - self.hold))
        if stop is not None:
            return self._take(len(self.text)), stop
        return self._take(len(self.text) - self.hold), None

    def _find_stop(self, search_from: int) -> str | None:
        best = None
        for s in self.params.stop:
            pos = self.text.find(s, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        self.text = self.text[: pos + len(s)] if self.params.include_stop_str_in_output else self.text[:pos]
        self.stopped = True
        return s

    def _take(self, upto: int) -> str:
        upto = max(upto, self.num_emitted)
        out = self.text[self.num_emitted : upto]
        self.num_emitted = upto
        return out

    def flush(self) -> str:
        return self._take(len(self.text))
