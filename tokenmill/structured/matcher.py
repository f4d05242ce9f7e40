"""RequestGrammar: one sequence's position in its grammar — fills its bitmask row, advances as tokens land."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class RequestGrammar:
    """Wraps an xgrammar GrammarMatcher. The engine calls ``fill_bitmask`` before a step samples this sequence
    and ``advance`` when the sampled token lands; never two steps in flight (the next mask needs this token)."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self.failed = False

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token_id: int) -> bool:
        """Accept the sampled token; True when the grammar has ended (its stop token accepted) or rejected the
        token, i.e. the sequence must stop. A rejection cannot happen with the mask applied unless another
        processor forbade every allowed token (min_tokens masking the grammar's final stop token)."""
        if self._matcher.accept_token(token_id):
            return self._matcher.is_terminated()
        self.failed = True
        logger.error("grammar rejected token %d (every allowed token was masked by another processor); stopping "
                     "the sequence", token_id)
        return True

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()
