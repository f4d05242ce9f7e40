"""RequestGrammar: one sequence's position in its grammar — fills its bitmask row, advances as tokens land."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class RequestGrammar:
    """Wraps an xgrammar GrammarMatcher. Its mask is filled just before a step samples this sequence, after the
    previous step's token landed and ``advance`` took it (the mask needs it); the step's forward pass may be
    queued before that, so a constrained sequence can have one token in flight, never a mask ahead of it."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self.failed = False

    @property
    def matcher(self) -> Any:
        """The xgrammar GrammarMatcher (structured/bitmask.py fills many rows in one call)."""
        return self._matcher

    @property
    def needs_mask(self) -> bool:
        """False once the grammar ended or failed: the sequence has finished and any row of it is surplus."""
        return not self.failed and not self._matcher.is_terminated()

    def advance(self, token_id: int) -> bool:
        """Accept the sampled token; True when the grammar has ended (its stop token accepted) or rejected the
        token, i.e. the sequence must stop. A rejection cannot happen with the mask applied unless another
        processor forbade every allowed token (min_tokens masking the grammar's final stop token)."""
        if self._matcher.accept_token(token_id):
            return self._matcher.is_terminated()
        self.failed = True
        # Not expected: the mask allows only tokens the grammar accepts (the compiler refuses grammars whose first
        # token the vocabulary cannot spell), unless another processor removed every one of them.
        logger.error("grammar rejected token %d (its mask allowed no sampled token: another processor masked every "
                     "allowed one, or the vocabulary cannot continue the grammar); stopping the sequence", token_id)
        return True

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()
