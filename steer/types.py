"""Plain engine types. The server converts wire requests into these once; nothing below the
server ever sees a pydantic request model."""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics)."""

    max_tokens: int | None = None  # None: the rest of the context (resolved by the backend)
    temperature: float = 1.0  # below GREEDY_BELOW means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past EOS (fixed-length benchmark outputs)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (legacy ``echo``)
    # OpenAI's penalties over the answer's tokens, vLLM's repetition penalty over prompt and answer, and
    # per-token logit biases as (token id, bias); applied in that order after the bias, as vLLM does
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is argmax in effect, and dividing float32 logits by it
        # overflows to NaN probabilities.
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model that generated it (steered rows: the
    steered model), before temperature and top_p (vLLM's default ``raw_logprobs``), and the ``top`` most
    likely tokens as (token id, log-probability), most likely first."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SteeringSpec:
    """How one request is steered. ``vector`` is a resolved, loaded vector name; strength 0 is vanilla."""

    strength: float
    vector: str
    compare: bool = False


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | developer | tool
    content: str


@dataclass(frozen=True)
class GenerationInput:
    """What a backend is asked to generate: chat messages, a raw prompt, or a prompt's token ids."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    echo: bool = False  # legacy completions: the answer starts with the prompt (and, with logprobs, its tokens')
    echo_only: bool = False  # echo with max_tokens 0: the prompt alone (one token is generated and dropped)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    max_tokens_param: str = "max_tokens"  # the request field max_tokens came from (for error messages)
