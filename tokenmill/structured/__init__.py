"""Structured outputs: grammar specs, their compilation (xgrammar), per-sequence matchers, the sampler's
bitmask hook, and tool-call parsing/enforcement for the chat API."""

from tokenmill.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
