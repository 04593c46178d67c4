"""Stop strings: cut the output before the first one, and never release text
that might turn out to be the start of one."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._released = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what may be released now. After a stop
        string is seen, :attr:`stopped` is true and nothing more is released."""
        if self.stopped:
            return ""
        self._text += delta
        if not self._stops:
            return self._release(len(self._text))
        start = max(0, self._released - self._longest + 1)
        hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        text = self._text
        for n in range(min(self._longest - 1, len(text) - self._released), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self._text[self._released : upto]
        self._released = upto
        return out
