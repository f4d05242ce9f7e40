"""Grammar compilation with xgrammar: a spec (StructuredOutputsParams) → a compiled grammar, cached by spec.

Why xgrammar over llguidance (benchmarks/structured_backends.py, results/structured_backends.json, SmolLM2's
49k vocabulary on this CPU box): its per-token mask — the work a constrained row adds to every step — took
1.9 µs median vs 24 µs; it compiles a typical schema in ~17 ms (llguidance ~6 ms cold, lazy masks later) and
both are cached here. Its cost is the install: it pulls in triton on Linux x86-64 (~1 GB; GPU installs have
it already through torch), where llguidance is a self-contained 8 MB wheel.

``compile`` is thread-safe and called off the engine thread (AsyncLLM.add_request runs it in a worker thread
before the request is queued), so the engine thread normally only hits the cache.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from tokenmill.structured.matcher import RequestGrammar
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.schema_support import unenforced_features

# A run of JSON whitespace is capped so a model cannot loop on blanks forever; 16 fits pretty-printed JSON
# seven levels deep with a two-space indent.
MAX_JSON_WHITESPACE = 16


class GrammarError(ValueError):
    """The spec is invalid or asks for something the engine cannot enforce (the server answers 400)."""


def choice_grammar(choices: list[str]) -> str:
    """EBNF alternation of the literal choices (JSON string escapes are valid EBNF literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class GrammarCompiler:
    """One per engine: the tokenizer's vocabulary prepared once (lazily: ~0.2 s for 49k tokens) and an LRU cache
    of compiled grammars keyed by ``StructuredOutputsParams.cache_key()``."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: set[int], cache_size: int = 256,
                 tokenizer_info: Any = None):
        """``tokenizer_info``: a ready xgrammar TokenizerInfo instead of ``hf_tokenizer`` (benchmarks on
        random-weight presets, which have no tokenizer)."""
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer_info = tokenizer_info
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.num_compiles = 0  # cache misses, for tests and metrics

    def _xgr_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError as exc:
                    raise GrammarError(
                        "structured outputs need the 'xgrammar' package (pip install tokenmill[structured])"
                    ) from exc
                info = self.tokenizer_info
                if info is None:
                    if self.hf_tokenizer is None:
                        raise GrammarError("structured outputs need the model's tokenizer; this model has none")
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar for ``spec`` (cached); GrammarError names what is wrong with it."""
        key = spec.cache_key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(spec)
        self._check_vocabulary_can_start(compiled, spec)
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A fresh per-sequence matcher over the (cached) compiled grammar."""
        return RequestGrammar(self.compile(spec))

    def _check_vocabulary_can_start(self, compiled: Any, spec: StructuredOutputsParams) -> None:
        """Refuse a grammar no token of this vocabulary can begin (e.g. a random-weight preset's synthetic
        tokenizer, whose ``t<id>`` words hold no brace or quote): every logit would be masked and the sampler
        would draw an arbitrary id the grammar then rejects. One mask fill per compile (cache miss)."""
        import torch
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
        if not bool(torch.any(bitmask != 0)):
            raise GrammarError(
                f"no token of the model's vocabulary can start this {spec.kind} output (the tokenizer cannot "
                "spell it: a random-weight model's synthetic tokenizer has only t<id> words); use a real tokenizer"
            )

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._xgr_compiler()
        kind = spec.kind
        whitespace: dict[str, Any] = (
            {"any_whitespace": False, "separators": (",", ":")} if spec.disable_any_whitespace
            else {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
        )
        if kind == "json":
            unenforced = unenforced_features(spec.json)
            if unenforced:
                raise GrammarError(
                    f"the JSON schema uses keywords the grammar engine cannot enforce: {', '.join(unenforced)}; "
                    "remove them or express the constraint with enum, anyOf, pattern or bounds"
                )
            return self._call(compiler.compile_json_schema, "JSON schema", json.dumps(spec.json), **whitespace)
        if kind == "json_object":
            return self._call(compiler.compile_json_schema, "JSON object", '{"type": "object"}',
                              strict_mode=False, **whitespace)
        if kind == "regex":
            return self._call(compiler.compile_regex, "regex", spec.regex)
        if kind == "choice":
            return self._call(compiler.compile_grammar, "choice", choice_grammar(spec.choice))
        return self._call(compiler.compile_grammar, "grammar (EBNF with a root rule)", spec.grammar)

    @staticmethod
    def _call(fn: Any, what: str, source: str, **kwargs: Any) -> Any:
        try:
            return fn(source, **kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            # xgrammar prefixes "[time] file.cc:line: "; keep the part that names the problem.
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = message.split(": ", 1)[-1] if ".cc:" in message else message
            raise GrammarError(f"invalid {what}: {message}") from exc
