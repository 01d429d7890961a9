"""Helpers for server tests: a tiny Llama with a real tokenizer, uvicorn in a thread, bounded waits."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx


def save_tiny_llama(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (context 512) saved with the tokenizer found in ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 from a background thread (``with ServerThread(app) as url``)."""

    def __init__(self, app: Any, startup_timeout: float = 60.0, wait_healthy: bool = True) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.startup_timeout = startup_timeout
        self.wait_healthy = wait_healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> str:
        self.thread.start()
        if self.wait_healthy:
            wait_until(self._healthy, self.startup_timeout, interval=0.05, what="the server's /health")
        else:
            wait_until(lambda: self.server.started, self.startup_timeout, interval=0.05, what="the server to bind")
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
