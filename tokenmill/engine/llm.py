"""LLM: the offline API — ``LLM(model=...).generate(prompts, params)`` and ``.chat(messages, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm import tqdm

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptInput = str | list[int]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine.from_kwargs(model=model, stream_outputs=False, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | SequenceABC[PromptInput],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, SequenceABC) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        order: list[str] = []
        for prompt, sp in zip(prompts, params_list, strict=True):
            if isinstance(prompt, str):
                if self.engine.tokenizer is None:
                    raise ValueError("this model has no tokenizer; pass token id lists instead of text")
                token_ids, text = self.engine.tokenizer.encode(prompt), prompt
            else:
                token_ids, text = list(prompt), None
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, token_ids, sp, prompt=text)
            order.append(request_id)
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        prompts = [self.engine.tokenizer.apply_chat_template(conv, add_generation_prompt=True) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(order)
        with tqdm(total=len(order), desc="requests", unit="req", disable=not use_tqdm or len(order) < 2) as bar:
            while len(finished) < len(order):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in order]
