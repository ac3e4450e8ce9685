"""Tool calling's prompt format and parser (jaxeff.data.tools) and tool records in chat training data."""

import json
import random

import jsonschema
import numpy as np
import pytest
from smollm2 import smollm2_path

from jaxeff.data.chat import BadRecord, encode_chat, encode_record, messages_of
from jaxeff.data.tokenizer import ByteTokenizer
from jaxeff.data.tools import ToolCallStream, call_grammar, parse_tool_calls, render_messages, template_takes_tools
from jaxeff.errors import GenerationError
from jaxeff.loader import load_tokenizer

WEATHER = {
  "type": "function",
  "function": {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
  },
}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty object
TOOLS = [WEATHER, CLOCK]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Weather in Paris and the time?"},
  {
    "role": "assistant",
    "content": None,
    "tool_calls": [CALL, {**CALL, "function": {"name": "now", "arguments": "{}"}}],
  },
  {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
  {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
  {"role": "assistant", "content": "18C at noon."},
]
# A small ChatML template without a tools section (the default format applies), and one with.
PLAIN = (
  "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
AWARE = (
  "{% if tools %}[tools:{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
  "{% for m in messages %}<{{ m.role }}>{% if m.content %}{{ m.content }}{% endif %}"
  "{% for c in m.tool_calls or [] %}call {{ c.function.name }}({{ c.function.arguments.city or '' }}){% endfor %}"
  "</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2():
  return load_tokenizer(smollm2_path())


def test_default_format_through_smollm2s_template(smollm2):
  assert not template_takes_tools(smollm2.chat_template) and template_takes_tools(AWARE)
  text = render_messages(smollm2, CONVERSATION, TOOLS, "auto")
  system, user, calls, results, answer, prompt = text.split("<|im_start|>")[1:]
  # The tools join the system message, one JSON line each, with the call format.
  assert system.startswith("system\nBe brief.\n\n# Tools\n") and system.endswith("</tool_call><|im_end|>\n")
  listed = system.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
  assert [json.loads(line) for line in listed] == TOOLS
  assert '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>' in system
  assert user == "user\nWeather in Paris and the time?<|im_end|>\n"
  assert calls == (
    'assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
  )
  assert results == "user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\nnoon\n</tool_response><|im_end|>\n"
  assert answer == "assistant\n18C at noon.<|im_end|>\n" and prompt == "assistant\n"
  # The model's own calls parse back to what was sent.
  _, parsed = parse_tool_calls(calls)
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
    ("get_weather", {"city": "Paris"}),
    ("now", {}),
  ]


def test_default_format_system_message_added_or_left_out(smollm2):
  question = [{"role": "user", "content": "hi"}]
  added = render_messages(smollm2, question, [WEATHER])
  assert added.startswith("<|im_start|>system\n# Tools\n") and "SmolLM" not in added  # replaces the default one
  # tool_choice "none": no tools in the prompt; no tools at all: exactly the template's own rendering.
  assert render_messages(smollm2, question, [WEATHER], "none") == smollm2.apply_chat_template(question)
  assert render_messages(smollm2, question) == smollm2.apply_chat_template(question)
  # A developer message is a system message.
  dev = render_messages(smollm2, [{"role": "developer", "content": "Be brief."}, *question], [WEATHER])
  assert dev.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and "developer" not in dev


def test_a_tools_aware_template_gets_the_tools_and_messages():
  tok = ByteTokenizer(chat_template=AWARE)
  text = render_messages(tok, CONVERSATION[1:], TOOLS, "required")
  assert text == (
    "[tools:get_weather;now;]<user>Weather in Paris and the time?</user><assistant>call get_weather(Paris)call now()"
    "</assistant><tool>18C</tool><tool>noon</tool><assistant>18C at noon.</assistant><assistant>"
  )  # roles as they are, each call's arguments an object
  assert (
    render_messages(tok, CONVERSATION[1:2], TOOLS, "none") == "<user>Weather in Paris and the time?</user><assistant>"
  )
  assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the request is not changed
  # tojson as transformers has it: keys in order, no HTML escapes, no ASCII escapes (Qwen lists tools so).
  params = {"type": "object", "properties": {"z": {}, "a": {}}}
  odd = [{"type": "function", "function": {"name": "f", "description": "a < b & 'c' ü", "parameters": params}}]
  listed = render_messages(ByteTokenizer(chat_template="{{ tools | tojson }}"), [], odd)
  assert listed == json.dumps(odd, ensure_ascii=False)


@pytest.mark.parametrize(
  "tools, choice, messages, field",
  [
    ([{"type": "retrieval"}], None, None, r"tools\[0\].type"),
    ([{"type": "function", "function": {"name": "a b"}}], None, None, r"tools\[0\].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, None, r"tools\[0\].function.name"),
    ([WEATHER, WEATHER], None, None, r"tools\[1\].function.name: 'get_weather' names two tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, None, "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], None, None, "parameters"),
    ({"type": "function"}, None, None, "tools: must be a list"),
    (TOOLS, {"type": "function", "function": {"name": "other"}}, None, "tool_choice.function.name: 'other' is not"),
    (TOOLS, "always", None, "tool_choice: must be"),
    (None, "required", None, 'tool_choice: "required" needs tools'),
    (TOOLS, None, [{"role": "robot", "content": "x"}], r"messages\[0\].role"),
    (TOOLS, None, [{"role": "user", "content": None}], r"messages\[0\].content: is missing"),
    (TOOLS, None, [{"role": "user", "content": "x", "tool_calls": [CALL]}], r"messages\[0\].tool_calls: only"),
    (
      TOOLS,
      None,
      [{"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}]}],
      r"messages\[0\].tool_calls\[0\].function.arguments: is not JSON",
    ),
  ],
)
def test_bad_tools_choices_and_messages_name_the_field(tools, choice, messages, field):
  tok = ByteTokenizer(chat_template=PLAIN)
  with pytest.raises(GenerationError, match=field) as e:
    render_messages(tok, messages or [{"role": "user", "content": "hi"}], tools, choice)
  assert e.value.param.startswith(("tools", "tool_choice", "messages"))


def test_call_grammar_forces_the_chosen_tool():
  assert (
    call_grammar(TOOLS, "auto") is None and call_grammar(TOOLS, "none") is None and call_grammar(TOOLS, None) is None
  )
  named = call_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
  assert {k: named[k] for k in ("type", "begin", "end")} == {
    "type": "tagged_json",
    "begin": "<tool_call>\n",
    "end": "\n</tool_call>",
  }
  schema = named["schema"]
  assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
  good, wrong_name = {"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "now", "arguments": {}}
  jsonschema.validate(good, schema)
  for bad in (wrong_name, {"name": "get_weather", "arguments": {}}, {**good, "extra": 1}):
    with pytest.raises(jsonschema.ValidationError):
      jsonschema.validate(bad, schema)
  required = call_grammar(TOOLS, "required")["schema"]
  assert len(required["anyOf"]) == 2
  jsonschema.validate(good, required), jsonschema.validate(wrong_name, required)
  with pytest.raises(jsonschema.ValidationError):  # a tool without parameters takes an empty object only
    jsonschema.validate({"name": "now", "arguments": {"x": 1}}, required)
  assert call_grammar([WEATHER], "required")["schema"] == schema  # one tool: its schema, no anyOf
  # What the grammar allows parses back to the call.
  _, (call,) = parse_tool_calls(named["begin"] + json.dumps(good) + named["end"])
  assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
  with pytest.raises(GenerationError, match="tool_choice.function.name"):
    call_grammar(TOOLS, {"type": "function", "function": {"name": "missing"}})


def test_call_grammar_keeps_parameter_refs_working():
  # Pydantic-style definitions (both tools name theirs "Item") and a recursive root ref.
  order = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
    "required": ["items"],
    "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}},
  }
  tree = {
    "type": "object",
    "properties": {"label": {"$ref": "#/definitions/Item"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["label"],
    "definitions": {"Item": {"type": "integer"}},
  }
  tools = [
    {"type": "function", "function": {"name": "order", "parameters": order}},
    {"type": "function", "function": {"name": "tree", "parameters": tree}},
  ]
  good_order = {"name": "order", "arguments": {"items": [{"sku": "a1"}]}}
  good_tree = {"name": "tree", "arguments": {"label": 1, "children": [{"label": 2, "children": []}]}}
  bad = [
    {"name": "order", "arguments": {"items": [{"sku": 3}]}},
    {"name": "tree", "arguments": {"label": 1, "children": [{"label": "x"}]}},
    {"name": "tree", "arguments": {"label": 1, "children": [{}]}},
  ]
  required = call_grammar(tools, "required")["schema"]
  named = call_grammar(tools, {"type": "function", "function": {"name": "tree"}})["schema"]
  assert sorted(required["$defs"]) == ["order", "order.Item", "tree", "tree.Item"]
  for schema, goods, bads in ((required, [good_order, good_tree], bad), (named, [good_tree], bad[1:] + [good_order])):
    jsonschema.Draft202012Validator.check_schema(schema)
    for instance in goods:
      jsonschema.validate(instance, schema)
    for instance in bads:
      with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance, schema)
  assert tools[0]["function"]["parameters"] == order  # the request's schemas are not changed


def _block(name, args):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


TEXTS = [
  _block("get_weather", {"city": "Paris"}),
  "Let me check. " + _block("get_weather", {"city": "Paris"}) + "\n" + _block("now", {}) + "\n",
  "Before <tool_call>{not json}</tool_call> between " + _block("now", {}) + " after",
  "plain text with a < sign and <tool_ call> and <tool_call no end",
  "  \n" + _block("now", {}) + "  ",
  "ends with a partial tag <tool_ca",
  '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',  # arguments as a JSON string
  '<tool_call>["not", "a", "call"]</tool_call><tool_call>{"name": 3}</tool_call>',
  "",
]


def test_parse_tool_calls():
  content, calls = parse_tool_calls(TEXTS[1])
  assert content == "Let me check."
  assert [c["function"] for c in calls] == [
    {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"name": "now", "arguments": "{}"},
  ]
  assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
  assert len({c["id"] for c in calls}) == 2
  assert parse_tool_calls(TEXTS[0])[0] is None  # only a call: no content
  content, calls = parse_tool_calls(TEXTS[2])  # the malformed block stays in the content
  assert content == "Before <tool_call>{not json}</tool_call> between  after" and len(calls) == 1
  assert parse_tool_calls(TEXTS[3]) == (TEXTS[3], [])
  assert parse_tool_calls(TEXTS[6])[1][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
  assert parse_tool_calls(TEXTS[7]) == (TEXTS[7], [])
  assert parse_tool_calls("") == ("", [])


def _streamed(text, cuts):
  stream, deltas, at = ToolCallStream(), [], 0
  for cut in sorted(cuts) + [len(text)]:
    deltas += stream.push(text[at:cut])
    at = cut
  return deltas + stream.finish()


def test_streaming_gives_the_one_shot_result_for_any_split():
  rng = random.Random(0)
  for text in TEXTS:
    content, calls = parse_tool_calls(text)
    want = (content or "", [(c["type"], c["function"]) for c in calls])
    for trial in range(40):
      cuts = [0] * len(text) if trial == 0 else rng.sample(range(len(text) + 1), min(len(text), rng.randint(1, 12)))
      if trial == 1:
        cuts = list(range(len(text)))  # one character at a time
      deltas = _streamed(text, cuts)
      assert all(len(d) == 1 and ("content" in d) != ("tool_calls" in d) for d in deltas)
      got = [d["tool_calls"] for d in deltas if "tool_calls" in d]
      assert [c[0]["index"] for c in got] == list(range(len(got)))
      assert all(c[0]["id"].startswith("call_") for c in got)
      joined = "".join(d["content"] for d in deltas if "content" in d)
      assert (joined, [(c[0]["type"], c[0]["function"]) for c in got]) == want, (text, cuts)


def test_streaming_holds_back_only_what_may_be_a_tag():
  stream = ToolCallStream()
  assert stream.push("Hello <tool") == [{"content": "Hello"}]  # the space waits for what follows
  assert stream.push("_call>\n{") == []  # inside a block: nothing until it closes
  call, after = stream.push('"name": "now", "arguments": {}}\n</tool_call> bye ')
  assert call["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
  assert after == {"content": "  bye"} and stream.finish() == []  # the held space, not the trailing one
  stream = ToolCallStream()
  assert stream.push("a <b") == [{"content": "a <b"}]  # "<b" cannot begin the tag
  assert stream.push(" <tool_call>{unclosed") == [] and stream.finish() == [{"content": " <tool_call>{unclosed"}]


def test_chat_training_records_with_tools():
  tok = ByteTokenizer(chat_template=PLAIN)
  record = {"messages": CONVERSATION, "tools": TOOLS}
  messages = messages_of(record)
  assert messages[2]["tool_calls"] == CONVERSATION[2]["tool_calls"] and messages[3]["tool_call_id"] == "call_1"
  ids, mask = encode_record(json.dumps(record), tok)
  assert tok.decode(ids) == render_messages(tok, CONVERSATION, TOOLS, add_generation_prompt=False)
  replies = [r for r in tok.decode(np.where(mask, ids, 0)).split("\0") if r]
  assert replies == [  # the calls and the final answer, each with its end of turn
    "\n".join(_block(n, a) for n, a in (("get_weather", {"city": "Paris"}), ("now", {}))) + "<|end|>\n",
    "18C at noon.<|end|>\n",
  ]
  # A tools-aware template trains on its own rendering of the calls.
  aware = ByteTokenizer(chat_template=AWARE)
  ids, mask = encode_chat(messages_of(record), aware, TOOLS)
  assert aware.decode(ids[mask]) == "call get_weather(Paris)call now()</assistant>18C at noon.</assistant>"
  with pytest.raises(BadRecord, match=r"bad tools or tool calls \(tools.function.name\)"):
    encode_record(json.dumps({**record, "tools": [{"type": "function", "function": {"name": "a b"}}]}), tok)
  with pytest.raises(BadRecord, match="without text content"):  # only an assistant's calls may leave it null
    messages_of({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]})
