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
        return self._extend(self.detok.push([token_id]))

    def _extend(self, new_text: str) -> tuple[str, str | None]:
        from cluster.models.tokenizer import find_stop

        start = len(self.text)
        self.text += new_text
        found = find_stop(self.text, self.params.stop, start) if self.params.stop and new_text else None
        if found is None:
            return self._take(len(self.text) - self.hold), None
        pos, stop = found
        self.text = self.text[: pos + len(stop)] if self.params.include_stop_str_in_output else self.text[:pos]
        self.stopped = True
        return self._take(len(self.text)), stop

    def _take(self, upto: int) -> str:
        upto = max(upto, self.num_emitted)
        out = self.text[self.num_emitted : upto]
        self.num_emitted = upto
        return out

    def flush(self) -> tuple[str, str | None]:
        """At the end: the detokenizer's and our held-back text (a stop string may still match in it)."""
        if self.detok is None:
            return "", None
        if self.stopped:
            return self._take(len(self.text)), None
        text, stop = self._extend(self.detok.flush())
        return text + self._take(len(self.text)), stop
