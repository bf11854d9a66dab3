"""steer/detok.py: incremental detokenization equals tokenizer.decode for every token sequence, in O(1)
decode work per token; stop matching on arbitrarily split text equals cutting the whole text.

Tokenizers: the ChatML byte-level BPE of conftest, a byte-level BPE trained on non-ASCII text (tokens
that split UTF-8 characters), a llama-2-style SentencePiece BPE (▁ spaces, byte fallback, Strip decoder),
a Metaspace (prepend_scheme="first") BPE, and the demo model's Qwen2.5 tokenizer when it is cached.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import pytest
from conftest import CORPUS, SPECIALS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from steer.detok import FullDetokenizer, IncrementalDetokenizer, StopMatcher, TokenBytes, detokenizer

PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UNICODE = ["héllo 世界 🙂 naïve café, Привет мир! こんにちは 😀👍🏽 ∑x² → ∞"] * 20
# what generated text is drawn from: ASCII, 2/3/4-byte characters, a ZWJ-free emoji modifier sequence and
# a genuine U+FFFD character (decoded, it looks exactly like an incomplete one)
ALPHABET = list("ab xyz.,!?'\n\t") + ["é", "ï", "世", "界", "Ж", "∞", "🙂", "👍🏽", "\ufffd", "  "]
QWEN = Path.home() / ".cache/steer/models/qwen2.5-coder-0.5b-instruct-bf16"
FAST_KINDS = ["chatml", "bytelevel-unicode", "llama2-bytefallback", "metaspace"]


# ---------------------------------------------------------------- tokenizers


def _fast(tok: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@functools.cache
def build(kind: str) -> PreTrainedTokenizerFast:
    if kind == "bytelevel-unicode":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS + UNICODE, trainers.BpeTrainer(
            vocab_size=450, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return _fast(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if kind == "llama2-bytefallback":
        # llama-2's tokenizer.json layout: "▁" for spaces, byte-fallback tokens <0xXX> in the model vocab
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.train_from_iterator(CORPUS + ["héllo café"] * 20, trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60))
        spec = json.loads(tok.to_str())
        for b in range(256):  # 世, 🙂, ... are not in the vocab: they encode as 3-4 byte tokens
            spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
        spec["model"]["byte_fallback"] = True
        return _fast(Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train_from_iterator(CORPUS + UNICODE, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
        return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    raise ValueError(kind)


@pytest.fixture(scope="module", params=FAST_KINDS)
def tok(request, tiny_tokenizer) -> PreTrainedTokenizerFast:
    return tiny_tokenizer if request.param == "chatml" else build(request.param)


@functools.cache
def qwen() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(QWEN)


class DecodeOnly:
    """A tokenizer that only has ``decode`` (no tokenizers backend): takes the generic path."""

    def __init__(self, tok, clean_up_tokenization_spaces: bool = False):
        self.tok, self.clean_up_tokenization_spaces = tok, clean_up_tokenization_spaces
        self.all_special_ids = special_ids(tok)  # what tok.decode skips

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, i: int) -> str | None:
        return self.tok.convert_ids_to_tokens(i)


# ---------------------------------------------------------------- strategies and checks


def special_ids(tok) -> list[int]:
    return sorted(i for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items() if t.special)


@st.composite
def token_ids(draw, tok, vocab: int | None = None) -> list[int]:
    """Either random ids (mostly invalid UTF-8 on byte-level vocabularies) or the encoding of random
    text with random ids and special tokens spliced in. Ids up to ``vocab`` (the model's embedding size,
    larger than the tokenizer's vocabulary on real models) decode to nothing when unknown."""
    vocab = vocab or len(tok) + 3
    any_id = st.one_of(st.integers(0, vocab - 1), st.sampled_from(special_ids(tok)))
    if draw(st.booleans()):
        return draw(st.lists(any_id, max_size=40))
    text = "".join(draw(st.lists(st.sampled_from(ALPHABET), max_size=30)))
    ids = tok.encode(text, add_special_tokens=False)
    for pos, t in draw(st.lists(st.tuples(st.integers(0, 40), any_id), max_size=6)):
        ids.insert(min(pos, len(ids)), t)
    return ids


def check_stream(tok, ids: list[int], skip: bool = True, view=None) -> None:
    """push()/flush() add up to decode(ids); and after each push the text handed out so far is all of
    decode(ids[:k]) unless that ends in U+FFFD or with a byte-fallback token (then a prefix of it)."""
    det = IncrementalDetokenizer(view or tok, skip_special_tokens=skip)
    skipped = set(special_ids(tok)) if skip else set()
    out, in_byte_run = "", False
    for k, t in enumerate(ids, 1):
        piece = det.push(t)
        assert isinstance(piece, str) and not piece.endswith("\ufffd")
        out += piece
        token = tok.convert_ids_to_tokens(t)
        if t not in skipped and token is not None:  # decode drops both
            in_byte_run = bool(re.fullmatch(r"<0x..>", token))
        now = tok.decode(ids[:k], skip_special_tokens=skip)
        assert now.startswith(out)
        if not now.endswith("\ufffd") and not in_byte_run:
            assert out == now
    assert out + det.flush() == tok.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------- IncrementalDetokenizer


@PROPS
@given(data=st.data(), skip=st.booleans())
def test_push_flush_equals_decode(tok, data, skip):
    check_stream(tok, data.draw(token_ids(tok)), skip)


@PROPS
@given(data=st.data())
def test_generic_decode_path_equals_decode(tok, data):
    """A tokenizer without a tokenizers backend goes through its own decode() on the window."""
    check_stream(tok, data.draw(token_ids(tok)), view=DecodeOnly(tok))


@pytest.mark.parametrize("kind", ["bytelevel-unicode", "llama2-bytefallback"])
def test_split_character_is_held_until_complete(kind):
    tok = build(kind)
    ids = tok.encode("a 🎉 b", add_special_tokens=False)  # 🎉 is not in the training text: 4 byte tokens
    det = IncrementalDetokenizer(tok)
    pieces = [det.push(t) for t in ids]
    assert pieces.count("") >= 2 and any("🎉" in p for p in pieces)
    assert "".join(pieces) == "a 🎉 b" and det.flush() == ""
    cut = tok.encode("a 🎉", add_special_tokens=False)[:-1]  # the answer ends inside the character
    det = IncrementalDetokenizer(tok)
    held = "".join(det.push(t) for t in cut)
    tail = det.flush()
    assert "\ufffd" not in held and tail.endswith("\ufffd") and held + tail == tok.decode(cut)


@functools.cache
def _token_bytes(tok) -> TokenBytes:
    return TokenBytes(tok)


@PROPS
@given(data=st.data())
def test_token_bytes_spell_the_text_on_byte_level_tokenizers(data):
    """The logprobs ``bytes`` of every token, a token that holds part of a character included, join to
    the text's UTF-8; special tokens are their content."""
    for tok in (build("bytelevel-unicode"), *([qwen()] if QWEN.is_dir() else [])):
        text = "".join(data.draw(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=30)))
        ids = tok.encode(text, add_special_tokens=False)
        tb = _token_bytes(tok)
        assert b"".join(tb(i) for i in ids) == text.encode()
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        assert tb(eos) == b"<|im_end|>"


def test_token_bytes_on_sentencepiece_tokenizers():
    """Byte-fallback tokens are their byte; a piece's word-boundary mark is a space (the first token's
    included: each token's own bytes, as OpenAI's logprobs show a token)."""
    tok = build("llama2-bytefallback")
    text = "héllo 世界 🙂 café"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", t) for t in tok.convert_ids_to_tokens(ids))
    assert b"".join(TokenBytes(tok)(i) for i in ids) == (" " + text).encode()
    tok = build("metaspace")
    ids = tok.encode("hello world the fox", add_special_tokens=False)
    assert b"".join(TokenBytes(tok)(i) for i in ids) == b" hello world the fox"


def test_leading_space_of_a_later_word_survives_metaspace():
    for kind in ("metaspace", "llama2-bytefallback"):
        tok = build(kind)
        ids = tok.encode("hello world  the fox", add_special_tokens=False)
        det = IncrementalDetokenizer(tok)
        pieces = [det.push(t) for t in ids]
        assert "".join(pieces) + det.flush() == "hello world  the fox" == tok.decode(ids)
        assert not pieces[0].startswith(" ")  # first token's "▁" stripped, as decode does


def _decoded_per_push(det: IncrementalDetokenizer, ids: list[int]) -> list[int]:
    """How many token ids reach the underlying decode during each push."""
    inner, count = det._decode, [0]

    def counting(window: list[int]) -> str:
        count[0] += len(window)
        return inner(window)

    det._decode = counting
    per_push = []
    for t in ids:
        count[0] = 0
        det.push(t)
        per_push.append(count[0])
    return per_push


def test_decode_work_per_token_does_not_grow_with_position():
    """The same block of tokens (multi-byte characters, split emoji, skipped specials) costs the same
    decode work at position ~50 as at position ~4000: no growth with the answer's length."""
    tok = build("bytelevel-unicode")
    block = tok.encode(" ".join(CORPUS[:5] + UNICODE[:1]) + " 🎉 ok", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    block = [t for i, x in enumerate(block) for t in ((x, eos) if i % 7 == 0 else (x,))]
    ids, n = block * 40, len(block)
    assert len(ids) > 4000
    det = IncrementalDetokenizer(tok)
    per_push = _decoded_per_push(det, ids)
    assert max(per_push) <= 16
    assert per_push[-n:] == per_push[n : 2 * n]
    det = IncrementalDetokenizer(DecodeOnly(tok))  # the generic path: the same windows
    assert _decoded_per_push(det, ids) == per_push


def test_skipped_special_tokens_cost_nothing():
    tok = build("bytelevel-unicode")
    det = IncrementalDetokenizer(tok)
    specials = special_ids(tok) * 500
    assert set(_decoded_per_push(det, specials)) == {0} and det.flush() == ""
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)  # not skipped: text, still O(1)
    assert max(_decoded_per_push(det, specials)) <= 4


def test_cleanup_that_rewrites_across_tokens_is_refused():
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, ".": 2, "##b": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert fast.decode([1, 2]) == "a."  # the backend says "a ." and the cleanup joins it
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces"):
        IncrementalDetokenizer(fast)
    det = detokenizer(fast)  # what the engine uses: full decoding, with the same contract
    assert isinstance(det, FullDetokenizer)
    ids = [1, 3, 2, 1, 2]
    assert "".join(det.push(t) for t in ids) + det.flush() == fast.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces"):
        IncrementalDetokenizer(DecodeOnly(build("metaspace"), clean_up_tokenization_spaces=True))
    # transformers ignores the flag on BPE models, so such a tokenizer is accepted and exact
    bpe = build("bytelevel-unicode")
    bpe_cleanup = PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, clean_up_tokenization_spaces=True)
    ids = bpe.encode("a . b , c ? d", add_special_tokens=False)
    det = IncrementalDetokenizer(bpe_cleanup)
    assert "".join(det.push(t) for t in ids) + det.flush() == bpe_cleanup.decode(ids) == "a . b , c ? d"


@pytest.mark.slow
@pytest.mark.skipif(not QWEN.is_dir(), reason=f"the demo model's tokenizer is not cached at {QWEN}")
def test_qwen_tokenizer():
    """The real thing: Qwen2.5's byte-level BPE with its 22 added tokens, ids up to the model's 151936
    embedding rows (beyond the tokenizer's vocabulary: decode drops them). Loading takes ~1 s."""
    tok = qwen()
    det = IncrementalDetokenizer(tok)
    assert isinstance(det._decode.func.__self__, Tokenizer)  # the Rust decode, not the Python wrapper
    ids = tok.encode("def f():\n    return '世界 🫠'  # naïve", add_special_tokens=False)
    pieces = [det.push(t) for t in ids]
    assert "" in pieces and " 🫠" in pieces  # 🫠 is split over 3 tokens

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data(), skip=st.booleans())
    def prop(data, skip):
        check_stream(tok, data.draw(token_ids(tok, vocab=151936)), skip)

    prop()
    long = tok.encode(Path(__file__).read_text() + "".join(UNICODE), add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    t0 = time.perf_counter()
    assert "".join(det.push(t) for t in long) + det.flush() == tok.decode(long, skip_special_tokens=True)
    assert (time.perf_counter() - t0) / len(long) < 1e-3  # microseconds per token in practice
    assert max(_decoded_per_push(IncrementalDetokenizer(tok), long)) <= 16


# ---------------------------------------------------------------- StopMatcher

STOP_CHARS = st.sampled_from(["a", "b", "\n", "é", "🙂"])  # few characters: many overlapping matches
STOP_TEXT = st.text(STOP_CHARS, max_size=40)
STOPS = st.lists(st.text(STOP_CHARS, min_size=1, max_size=5), min_size=1, max_size=4)


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Character-by-character streaming: cut at the first point where a stop string is complete
    (the longest one if several end there), independent of the matcher's search."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m, out, fed, held = StopMatcher(stops), "", "", []
    for p in pieces:
        emit, hit = m.push(p)
        out, fed = out + emit, fed + p
        if hit:
            return out, True, held
        held.append(fed[len(out):])
    return out + m.flush(), False, held


@PROPS
@given(text=STOP_TEXT, stops=STOPS, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stop_matcher_equals_cutting_the_whole_text(text, stops, cuts):
    out, hit, held = run_matcher(stops, split(text, cuts))
    assert (out, hit) == reference(text, stops)
    longest = max(map(len, stops))
    for h in held:  # only what may still start a stop string is held back
        assert len(h) < longest and (h == "" or any(s.startswith(h) and s != h for s in stops))


@PROPS
@given(text=STOP_TEXT, stops=STOPS, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stop_matcher_is_the_earliest_occurrence_when_no_stop_contains_another(text, stops, cuts):
    assume(not any(a != b and a in b for a in stops for b in stops))
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    out, hit, _ = run_matcher(stops, split(text, cuts))
    assert (out, hit) == ((text[: min(hits)], True) if hits else (text, False))


@PROPS
@given(text=STOP_TEXT, stops=STOPS, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_emits_everything_that_cannot_start_a_stop(text, stops, cuts):
    """Nothing is held longer than needed: the held tail is the longest suffix that is a proper prefix
    of a stop string."""
    _, hit, held = run_matcher(stops, split(text, cuts))
    fed = ""
    for p, h in zip(split(text, cuts), held, strict=False):
        fed += p
        want = max((n for n in range(len(fed) + 1) if any(len(s) > n and s.startswith(fed[len(fed) - n:])
                                                           for s in stops)), default=0)
        assert len(h) == want


def test_stop_matcher_examples():
    m = StopMatcher(("abcd", "c"))
    assert m.push("ab") == ("", False)  # "ab" may start "abcd"
    assert m.push("c") == ("ab", True)  # "c" completes first; the stop itself is never emitted
    assert m.push("d") == ("", True) and m.flush() == "" and m.finished
    assert StopMatcher(["c", "bc"]).push("abcd") == ("a", True)  # both end at "c": cut before the longer
    m = StopMatcher(["\n\n", "END"])
    assert m.push("one\n") == ("one", False)
    assert m.push("two EN") == ("\ntwo ", False)
    assert m.push("Dless") == ("", True)
    m = StopMatcher([])
    assert m.push("x\ufffd") == ("x\ufffd", False) and m.flush() == ""
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


@PROPS
@given(data=st.data(), stops=STOPS)
def test_detokenizer_then_stop_matcher(data, stops):
    """The pipeline the engine runs: token ids -> text pieces -> stop cut, against decode-then-cut."""
    tok = build("llama2-bytefallback")
    ids = data.draw(token_ids(tok))
    det, m, out, hit = IncrementalDetokenizer(tok), StopMatcher(stops), "", False
    for t in ids:
        emit, hit = m.push(det.push(t))
        out += emit
        if hit:
            break
    if not hit:
        emit, hit = m.push(det.flush())
        out += emit + m.flush()
    assert (out, hit) == reference(tok.decode(ids, skip_special_tokens=True), stops)
