"""tokenmill: paged-KV LLM engine, OpenAI-compatible server, benchmark tool and gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM


def __getattr__(name: str):
    # LLM pulls in torch models and transformers; import it only when asked for.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
