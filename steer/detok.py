"""Incremental detokenization and stop-string matching in O(1) work per generated token.

``IncrementalDetokenizer`` turns token ids into text pieces; ``StopMatcher`` cuts that text at the first
stop string. For every token sequence ``ids``::

    "".join(d.push(t) for t in ids) + d.flush() == tokenizer.decode(ids, skip_special_tokens=skip)

and for every text cut into any pieces, the concatenated output of a ``StopMatcher`` is the text cut
where a stop string is first completed (see ``StopMatcher``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger("steer.detok")
REPLACEMENT = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a SentencePiece byte-fallback token
Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """Decodes one generated sequence token by token, with a window of O(1) tokens per ``push``.

    The prefix/read-offset algorithm of vLLM and ``tokenizers.decoders.DecodeStream``: decode a short
    window of ids, the "context" tokens whose text was already handed out plus the "pending" tokens
    after them, and hand out what the pending tokens add. After a hand-out the pending tokens become the
    next context, so the window is the last piece's tokens plus the pending ones. Decoding with a context
    rather than the new tokens alone keeps decoders that treat the first token specially (Metaspace /
    SentencePiece strip its leading space) right. Special tokens that decode skips and ids outside the
    vocabulary are dropped before the window and cost nothing.

    Text is handed out only once it is final. A push returns "" and its token stays pending while the
    text ends in U+FFFD (a multi-byte character split over several tokens is incomplete), while the
    token adds no text, and while it extends a run of byte-fallback tokens (<0xE4><0xB8><0x96>): the
    ByteFallback decoder turns the *whole* run into U+FFFDs as soon as any of it is invalid UTF-8, so
    even a valid start of the run is final only once a token of another kind ends it.

    On a tokenizers-backed ("fast") tokenizer the window goes straight to the Rust decode, which is what
    ``tokenizer.decode`` runs; any other tokenizer is called through its own ``decode`` on the window.
    Tokenizers whose decode applies ``clean_up_tokenization_spaces`` are refused with ``ValueError``:
    that cleanup rewrites text across piece boundaries (" ." -> "."), so use full decoding for them.

    Worst case: a run of k consecutive tokens that each leave the text ending in U+FFFD (garbage bytes)
    or add no text, or of k byte-fallback tokens, keeps k tokens pending: O(k) per push in that run.

    Not thread-safe; one instance per sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | Any, *, skip_special_tokens: bool = True):
        self._decode, self._skip, self._token, self._fallback = _decoder(tokenizer, skip_special_tokens)
        self._ids: list[int] = []  # window: context ids, then pending ids
        self._start = 0  # window[:start] is context, window[start:] pending
        self._prefix = ""  # decode(window[:start]), already handed out

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is incomplete)."""
        if token_id in self._skip:
            return ""
        token = self._token(token_id) if self._token is not None else ""
        if token is None:
            return ""  # not in the vocabulary (a model's padded embedding rows): decode drops it too
        self._ids.append(token_id)
        if self._fallback and _BYTE.fullmatch(token):
            return ""  # a byte-fallback run decodes all-or-nothing: wait for its end
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(REPLACEMENT):
            return ""
        piece = self._piece(text)
        self._ids = self._ids[self._start :]
        self._start = len(self._ids)
        self._prefix = self._decode(self._ids)
        return piece

    def flush(self) -> str:
        """End of the sequence: the text still held back, as ``tokenizer.decode`` renders it.

        That is a trailing incomplete UTF-8 sequence as U+FFFD (or, on byte-fallback tokenizers, one
        U+FFFD per byte token of an invalid run), or a genuine trailing U+FFFD character. Call it once,
        after the last push.
        """
        if self._start == len(self._ids):
            return ""
        text = self._decode(self._ids)
        piece = self._piece(text) if len(text) > len(self._prefix) else ""
        self._ids, self._start, self._prefix = [], 0, ""
        return piece

    def _piece(self, text: str) -> str:
        if not text.startswith(self._prefix):
            raise RuntimeError(f"decode of a longer window changed text already handed out: {self._prefix!r} "
                               f"-> {text!r}; this tokenizer cannot be decoded incrementally")
        return text[len(self._prefix) :]


def _decoder(tok: Any, skip: bool) -> tuple[Decode, frozenset[int], Callable[[int], str | None] | None, bool]:
    """For ``tok``: the window decode (equal to ``tok.decode``), the special ids it skips, its id -> token
    lookup (None for ids it drops), and whether its decoder may have byte fallback."""
    backend = getattr(tok, "backend_tokenizer", None)
    standard = (isinstance(tok, PreTrainedTokenizerFast) and type(tok).decode is PreTrainedTokenizerBase.decode
                and type(tok)._decode is PreTrainedTokenizerFast._decode)
    if isinstance(backend, tokenizers.Tokenizer) and standard:
        # TokenizersBackend._decode = backend decode + cleanup, which it skips for BPE models unless forced
        forced = getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        if tok.clean_up_tokenization_spaces and (type(backend.model).__name__ != "BPE" or forced):
            raise ValueError(_CLEANUP)
        special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        fallback = "ByteFallback" in _decoder_kinds(backend)
        return (partial(backend.decode, skip_special_tokens=skip), special if skip else frozenset(),
                backend.id_to_token, fallback)
    if getattr(tok, "clean_up_tokenization_spaces", False):
        raise ValueError(_CLEANUP)
    # transformers' Python tokenizers skip exactly all_special_ids
    special = frozenset(getattr(tok, "all_special_ids", ())) if skip else frozenset()
    return partial(tok.decode, skip_special_tokens=skip), special, getattr(tok, "convert_ids_to_tokens", None), True


_CLEANUP = ("tokenizer.decode applies clean_up_tokenization_spaces, which rewrites text across token "
            "boundaries; it cannot be decoded incrementally (decode the whole sequence instead)")


class TokenBytes:
    """Token id -> the UTF-8 bytes the token stands for, as OpenAI's logprobs ``bytes`` give them: exact
    for byte-level BPE (GPT-2, Qwen2, Llama 3: a token may hold part of a character) and SentencePiece
    byte fallback (``<0xE4>``), the token's text with its word-boundary mark as a space for SentencePiece
    pieces, an added token's content, and ``decode([id])`` for any other tokenizer. Concatenated over a
    byte-level answer they are its UTF-8 text. Cached per id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        kinds: set[str] = set()
        if isinstance(backend, tokenizers.Tokenizer):
            kinds = _decoder_kinds(backend)
            added = backend.get_added_tokens_decoder()
            self._token = backend.id_to_token
        else:
            added = getattr(tokenizer, "added_tokens_decoder", {})
            self._token = getattr(tokenizer, "convert_ids_to_tokens", None)
        self._added = {i: t.content for i, t in added.items()}
        self._tok = tokenizer
        self._byte_level = "ByteLevel" in kinds and self._token is not None
        self._pieces = bool(kinds & {"ByteFallback", "Metaspace", "Replace"}) and self._token is not None
        if self._byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._unbyte = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._bytes(token_id)
        return got

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self._token(token_id) if (self._byte_level or self._pieces) else None
        if token is None:
            return self._tok.decode([token_id]).encode()
        if self._byte_level and all(c in self._unbyte for c in token):
            return bytes(self._unbyte[c] for c in token)
        if _BYTE.fullmatch(token):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()


def _decoder_kinds(backend: tokenizers.Tokenizer) -> set[str]:
    """The types of a tokenizers backend's decoder (a Sequence's, flattened)."""
    def kinds(spec: dict) -> set[str]:
        if spec.get("type") == "Sequence":
            return set().union(*(kinds(d) for d in spec.get("decoders", [])))
        return {spec.get("type", "")}

    return kinds(json.loads(backend.decoder.__getstate__())) if backend.decoder is not None else set()


class StopMatcher:
    """Cuts streamed text at the first stop string; the stop string itself is never emitted (OpenAI).

    ``push(piece)`` returns ``(text, hit)``: the text that may be emitted now and whether a stop string
    was completed. Without a hit it holds back only the longest tail of the text that is a proper prefix
    of some stop string (at most ``max(len(stop)) - 1`` characters). On a hit it returns everything before
    the stop and ``True``, and the matcher is finished: later pushes return ``("", True)`` and ``flush()``
    returns "". ``flush()`` at the end of generation (length / EOS) returns the held-back text.

    Semantics: the output is the text cut at the start of the stop occurrence that is *completed first*
    (smallest end; of those ending at the same place, the longest), whatever the pieces are. That equals
    the earliest occurrence when no stop string contains another one; when one does (stops "abcd" and
    "c"), streaming cannot wait for the longer one, so "abc|d" stops at "ab".

    One Knuth-Morris-Pratt automaton per stop string, fed each new character once: O(len(piece)) steps
    per stop string per push, amortized, whatever the stop strings' length. Pieces from
    ``IncrementalDetokenizer.push`` never end in an incomplete character, so no U+FFFD rule is needed here.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        if not all(self.stops):
            raise ValueError("stop strings must not be empty")
        self._fail = [_failure(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: longest suffix of the text that is its prefix
        self._tail = ""  # text held back: its last max(self._matched) characters
        self.finished = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.finished:
            return "", True
        base, text = len(self._tail), self._tail + piece
        for j, c in enumerate(piece):
            done = 0  # length of the longest stop string completed by this character
            for n, (s, fail) in enumerate(zip(self.stops, self._fail, strict=True)):
                k = self._matched[n]
                while k and s[k] != c:
                    k = fail[k - 1]
                k = k + 1 if s[k] == c else 0
                if k == len(s):
                    done, k = max(done, k), fail[k - 1]
                self._matched[n] = k
            if done:
                self._tail, self.finished = "", True
                return text[: base + j + 1 - done], True
        cut = len(text) - max(self._matched, default=0)
        self._tail = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """The text held back (call at the end of generation); "" after a hit."""
        tail, self._tail = self._tail, ""
        return tail


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of s[:i+1] that is a suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        k = k + 1 if s[i] == s[k] else 0
        fail[i] = k
    return fail


class FullDetokenizer:
    """The fallback for tokenizers :class:`IncrementalDetokenizer` refuses: ``push``/``flush`` with the
    same contract, by decoding the whole sequence each time (O(n) per token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | Any, *, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._out = 0  # characters handed out

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        end = len(text.rstrip(REPLACEMENT))
        piece, self._out = text[self._out : end], max(self._out, end)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        piece, self._out = text[self._out :], len(text)
        return piece


def detokenizer(tokenizer: PreTrainedTokenizerBase | Any) -> IncrementalDetokenizer | FullDetokenizer:
    """An incremental detokenizer where the tokenizer allows one, else full decoding (logged once)."""
    try:
        return IncrementalDetokenizer(tokenizer)
    except ValueError as e:
        if id(tokenizer) not in _WARNED:
            _WARNED.add(id(tokenizer))
            log.warning("decoding every answer in full at each token (O(n) per token): %s", e)
        return FullDetokenizer(tokenizer)


_WARNED: set[int] = set()
