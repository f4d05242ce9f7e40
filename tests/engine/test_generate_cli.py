"""`tokenmill generate` from the shell, on a tiny model (a real subprocess, as a user runs it)."""

from __future__ import annotations

import subprocess
import sys


def test_generate_prints_a_completion_for_each_prompt(tiny_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill", "generate", str(tiny_llama_dir), "--device", "cpu",
         "--prompt", "The quick brown fox", "--prompt", "Paris is", "--max-tokens", "5"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "### The quick brown fox" in result.stdout and "### Paris is" in result.stdout


def test_generate_rejects_a_bad_sampling_value_with_a_clear_message(tiny_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill", "generate", str(tiny_llama_dir), "--device", "cpu", "--top-p", "1.5"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2
    assert "error: top_p must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
