"""StructuredOutputsParams validation, the grammar compiler (errors, cache) and the unenforced-keyword check.

The keyword check is kept honest here: each keyword it rejects is shown to be compiled but NOT enforced by
xgrammar (a violating instance is accepted by a matcher), so dropping a rejection would be a silent hole.
"""

from __future__ import annotations

import pickle

import pytest

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.compiler import GrammarCompiler, GrammarError, choice_grammar
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.schema_support import unenforced_features

xgr = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tiny_models import build_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    build_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture
def compiler(tiny_tokenizer):
    return GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), {tiny_tokenizer.eos_token_id})


def test_spec_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="unsupported fields"):
        StructuredOutputsParams.from_value({"regex": "a", "lark": "x"})


def test_spec_is_plain_data_and_keys_ignore_key_order():
    a = StructuredOutputsParams(json='{"type": "object", "required": ["x"]}')
    b = StructuredOutputsParams(json={"required": ["x"], "type": "object"})
    assert a.cache_key() == b.cache_key()
    assert pickle.loads(pickle.dumps(a)) == a  # crosses the engine-process boundary
    params = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.structured_outputs.kind == "choice"


def test_compile_errors_name_the_problem(compiler):
    cases = [
        (StructuredOutputsParams(regex="[a-"), "invalid regex"),
        (StructuredOutputsParams(grammar="root ::= missing"), "invalid grammar"),
        (StructuredOutputsParams(json={"type": "foo"}), "invalid JSON schema"),
        (StructuredOutputsParams(json={"not": {"type": "string"}}), "#/not"),
        (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"allOf": [{"minimum": 1}]}}}),
         "#/properties/a/allOf"),
    ]
    for spec, words in cases:
        with pytest.raises(GrammarError, match=words.replace("[", r"\[")):
            compiler.compile(spec)


def test_compile_is_cached_by_spec(compiler):
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    first = compiler.compile(spec)
    again = compiler.compile(StructuredOutputsParams(json={"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert again is first and compiler.num_compiles == 1
    compiler.compile(StructuredOutputsParams(regex="[0-9]+"))
    assert compiler.num_compiles == 2


def test_property_named_like_a_keyword_is_fine():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}}
    assert unenforced_features(schema) == []
    assert unenforced_features({"$defs": {"x": {"if": {}}}, "anyOf": [{"not": {}}]}) == ["#/$defs/x/if", "#/anyOf/0/not"]


VIOLATIONS = [  # (schema with the keyword, an instance violating only that keyword)
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    ({"not": {"type": "integer"}}, "1"),
    ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "1"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}, '{"a":1}'),
]


@pytest.mark.parametrize("schema,instance", VIOLATIONS, ids=[sorted(set(s) - {"type", "items", "properties"})[0]
                                                            for s, _ in VIOLATIONS])
def test_rejected_keywords_are_really_unenforced(tiny_tokenizer, schema, instance):
    """xgrammar compiles these and accepts a violating instance; our check must reject them."""
    import json

    info = xgr.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                             separators=(",", ":"))
    assert xgr.GrammarMatcher(compiled).accept_string(instance)  # the hole
    assert unenforced_features(schema)  # ... which the server turns into a 400


def test_choice_grammar_escapes_literals(compiler, tiny_tokenizer):
    choices = ['say "hi"', "back\\slash", "new\nline", "café"]
    grammar = compiler.compile(StructuredOutputsParams(choice=choices))
    for choice in choices:
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(choice) and matcher.is_completed()
    assert choice_grammar(["a"]) == 'root ::= "a"'
