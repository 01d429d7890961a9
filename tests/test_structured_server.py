"""Structured outputs through the official `openai` client against the server: ``parse()`` of a
Pydantic model on the embedded default model (SmolLM2-135M-Instruct); a nested JSON schema checked
with `jsonschema`, ``json_object``, regex / choice / grammar through ``extra_body`` (vLLM's names),
streaming and not, completions and chat, and 400s that name the bad field, on a tiny random model
with the default model's tokenizer (the grammar alone must make its output valid)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Iterator, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import ServerThread

from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.server import create_app, server_engine_config

TIMEOUT = 1200.0
MODEL = "smollm"

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "genre": {"enum": ["fantasy", "science fiction", "mystery"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
        "author": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 30},
                                  "country": {"enum": ["UK", "USA", "France", "other"]}},
                   "required": ["name", "country"], "additionalProperties": False},
        "ratings": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5},
                    "minItems": 1, "maxItems": 4},
    },
    "required": ["title", "genre", "year", "author", "ratings"],
    "additionalProperties": False,
}


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
    population_millions: int = Field(ge=0, le=100000)


CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Sydney", "Toronto", "Berlin", "Mumbai", "Nairobi", "Madrid",
          "Seoul", "Chicago", "Rome", "Lagos", "Bogota", "Oslo", "Bangkok", "Dublin", "Santiago", "Vienna"]


def _serve(model_dir: Path) -> Iterator[str]:
    config = EngineConfig.from_dict({"model": {"path": str(model_dir)}, "backend": {"name": "cpu"},
                                     "scheduler": {"max_num_seqs": 32}})
    llm = LLM(config=server_engine_config(config))
    try:
        with ServerThread(create_app(llm, served_model_name=MODEL)) as base_url:
            yield base_url
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def default_url(default_model_dir: Path) -> Iterator[str]:
    """The embedded default model."""
    yield from _serve(default_model_dir)


@pytest.fixture(scope="module")
def url(tokenizer_model: Path) -> Iterator[str]:
    """A tiny random Llama with the default model's tokenizer."""
    yield from _serve(tokenizer_model)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def _chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.mark.slow
def test_parse_returns_a_valid_pydantic_object_for_20_prompts_of_20(default_url: str) -> None:
    async def one(client: openai.AsyncOpenAI, city: str) -> City | None:
        completion = await client.beta.chat.completions.parse(
            model=MODEL, messages=_chat(f"Describe the city of {city} as JSON."), response_format=City,
            max_tokens=100, temperature=0)
        return completion.choices[0].message.parsed

    async def run_all() -> list[City | None]:
        async with openai.AsyncOpenAI(base_url=default_url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, city) for city in CITIES))

    parsed = asyncio.run(run_all())
    assert len(parsed) == 20 and all(isinstance(item, City) for item in parsed)


def test_nested_schema_with_enums_and_arrays_is_valid_every_time(client: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "book", "schema": NESTED_SCHEMA, "strict": True}}
    prompts = ["Describe a famous novel as JSON.", "Invent a book and describe it.", "Tell me about a mystery book."]
    for prompt in prompts:
        reply = client.chat.completions.create(model=MODEL, messages=_chat(prompt), response_format=response_format,
                                               max_tokens=300, temperature=0.8, seed=7, n=2)
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), NESTED_SCHEMA)
    stream = client.chat.completions.create(model=MODEL, messages=_chat(prompts[0]), response_format=response_format,
                                            max_tokens=300, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), NESTED_SCHEMA)


def test_json_object(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="Write something:", max_tokens=300, temperature=1.0,
                                           seed=0, extra_body={"top_k": 5, "response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict)


def test_regex_and_choice_through_extra_body(client: openai.OpenAI) -> None:
    date = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"
    completion = client.completions.create(model=MODEL, prompt="The date of the moon landing was", max_tokens=20,
                                           temperature=0.7, seed=1, n=3, extra_body={"structured_outputs": {"regex": date}})
    assert all(re.fullmatch(date, c.text) for c in completion.choices), [c.text for c in completion.choices]
    completion = client.completions.create(model=MODEL, prompt="Answer: ", max_tokens=20,
                                           extra_body={"guided_regex": r"[A-Z]{3}-\d{2}"})
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", completion.choices[0].text)
    choices = ["positive", "negative", "neutral"]
    reply = client.chat.completions.create(model=MODEL, messages=_chat("Sentiment of 'I love it'?"), max_tokens=10,
                                           extra_body={"guided_choice": choices})
    assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=_chat("Sentiment of 'awful'?"), max_tokens=10,
                                            stream=True, extra_body={"structured_outputs": {"choice": choices}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in choices


def test_grammar_through_extra_body_streaming(client: openai.OpenAI) -> None:
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    stream = client.completions.create(model=MODEL, prompt="Is water wet?", max_tokens=20, stream=True,
                                       extra_body={"guided_grammar": gbnf})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text in ("The answer is yes.", "The answer is no.")


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "regular expression"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "unknown field"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "guided_grammar"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "only one"),
])
def test_bad_constraints_are_400_naming_the_field(url: str, body: dict, param: str, message: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": _chat("hi"), "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
