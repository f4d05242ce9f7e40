"""The keyword a transformers decoder takes its KV cache by: ``past_key_values`` until transformers 5.2x renamed it
``cache``. An unknown keyword lands in ``**kwargs`` and is ignored, so passing the wrong one silently runs every
step without the earlier tokens (the device's transformers 5.17 did exactly that to the EAGLE reference loop)."""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn


@cache
def _cache_keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    raise ValueError(f"{forward_type.__name__}.forward takes neither `cache` nor `past_key_values`")


def kv_cache_kwargs(model: nn.Module, kv_cache: object) -> dict[str, object]:
    """``{keyword: kv_cache}`` for ``model``'s forward, whichever name this transformers version uses."""
    return {_cache_keyword(type(model)): kv_cache}
