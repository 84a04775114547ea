"""Tokenizer and chat template against transformers' own outputs (fixtures/tokenizer/reference.json)."""

import json

import pytest
from conftest import FIXTURES

from codegen_jax import Tokenizer

REF = json.loads((FIXTURES / "tokenizer" / "reference.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES / "tokenizer")


def test_encode_decode_match_transformers(tok):
    cases = REF["encode"]
    assert cases
    for case in cases:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"]
        assert tok.decode(case["ids"]) == case["decoded"]


def test_chat_template_matches_transformers(tok):
    convs = REF["chat"]
    assert convs
    for conv in convs:
        assert tok.apply_chat_template(conv["messages"], add_generation_prompt=True) == conv["text"]
        assert tok.encode_chat(conv["messages"]) == conv["ids"]


def test_eos_is_im_end(tok):
    assert tok.eos_token_id == tok.tok.token_to_id("<|im_end|>")
