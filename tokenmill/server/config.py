"""ServerConfig: the HTTP side of `tokenmill serve` (address, auth, drain, limits), validated at construction.

The engine side lives in tokenmill/config.py (EngineConfig); server/cli.py builds both from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: pick a free port (the startup log line names the one chosen)
    api_key: str | None = None
    secure_metrics: bool = False  # when True /metrics needs the API key too
    drain_timeout: float = 30.0  # seconds in-flight requests may take to finish after SIGTERM
    engine_death_grace: float = 2.0  # seconds /health reports 503 before a dead-engine process exits
    max_request_bytes: int = 10 * 1024 * 1024
    log_prompts: bool = False
    log_level: str = "info"
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse tool calls from the model's text
    tool_call_parser: str | None = None  # vLLM's names: hermes, qwen, llama3_json, mistral

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string when given")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds; got {self.drain_timeout}")
        if self.engine_death_grace < 0:
            raise ValueError(f"engine_death_grace must be >= 0 seconds; got {self.engine_death_grace}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024; got {self.max_request_bytes}")
        if self.tool_call_parser is not None:
            from tokenmill.structured.tool_parsers import TOOL_PARSERS

            if self.tool_call_parser not in TOOL_PARSERS:
                raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}; got {self.tool_call_parser!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level must be one of critical, error, warning, info, debug; got {self.log_level!r}")
