"""Speculative decoding (issue 23): proposers (n-gram prompt lookup, a draft model), the adaptive policy that picks
k per step, acceptance statistics, and rejection sampling against a draft distribution.

The engine plugs a ``SpeculativeDecoder`` into the scheduler as its ``DraftProposer``; verification itself runs in
the target's ordinary step (verification rows, engine/step_record.py) and ``sampling/acceptance.py``.
"""
