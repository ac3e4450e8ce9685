"""Tool calling: the prompt that lists the tools, the grammar that forces a call, and the parser that
turns a reply's call blocks into OpenAI's `tool_calls` (one shot, or as a stream's deltas).

Requests carry OpenAI's shapes: `tools` = [{"type": "function", "function": {"name", "description",
"parameters"}}], `tool_choice` = "auto" | "none" | "required" | {"type": "function", "function":
{"name": ...}}, assistant messages with `tool_calls` (content may be null), tool messages with
`tool_call_id` and the tool's output as content.

The prompt (`render_messages`): a chat template that uses a `tools` variable (Qwen 2.5, Llama 3.1,
Hermes, ...) gets the tools and the messages as they are, except that each call's `arguments` JSON
string is given as the object it encodes (Hugging Face templates expect a dict, as vLLM passes it).
A template without one (SmolLM2's) gets the default format, Hermes/Qwen style, in plain messages:

- the system message (the first one, or one added at the front) ends with the tool list: each tool's
  JSON on its own line between `<tools>` and `</tools>`, and the instruction to answer a call with
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- an assistant message's `tool_calls` become such blocks after its text;
- consecutive tool messages become one user turn of `<tool_response>\\n...\\n</tool_response>` blocks;
- a developer message is a system message (OpenAI's newer name for it).

`tool_choice="none"` leaves the tools out of the prompt. A forced call ("required", or a named
function) is constrained by `call_grammar`'s spec: the block's JSON must match a listed tool's
parameter schema, so it always parses.

Replies are parsed for the same blocks, whichever template wrote the prompt:

>>> from jaxeff.data.tools import parse_tool_calls
>>> content, calls = parse_tool_calls('Checking.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
>>> content, [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
('Checking.', [('function', 'f', '{"x": 1}')])

A block whose JSON does not parse (or is not {"name": str, "arguments": object}) is no call: it
stays in the content. `ToolCallStream` does the same piece by piece for streamed replies.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets

from jaxeff.errors import GenerationError

BEGIN, END = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_BLOCK = re.compile(re.escape(BEGIN) + r"(.*?)" + re.escape(END), re.DOTALL)
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CHOICES = ("auto", "none", "required")

# The default format's system text (Hermes/Qwen style: what such fine-tunes were trained on).
_TOOLS_PROMPT = (
  "# Tools\n\nYou may call one or more of the functions below to answer the user. Their signatures are given "
  "as JSON, one per line, inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer "
  "with its name and arguments as a JSON object inside <tool_call></tool_call>, one block per call:\n"
  '<tool_call>\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


def _bad(field: str, problem: str) -> GenerationError:
  """A GenerationError naming `field` (also kept as `.param`, for an API error's param)."""
  error = GenerationError(f"{field}: {problem}")
  error.param = field
  return error


def check_tools(tools, tool_choice) -> list[dict]:
  """The tools as given (a list, [] for None), validated with `tool_choice`; GenerationError naming
  the field otherwise: each tool is {"type": "function", "function": {"name", ...}} with a name of
  1-64 letters, digits, `_` or `-` (unique), an optional string description and an optional JSON-schema
  object as parameters; tool_choice is auto/none/required or names a listed function."""
  if tools is None:
    tools = []
  if not isinstance(tools, list):
    raise _bad("tools", "must be a list of tools")
  names = set()
  for i, tool in enumerate(tools):
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
      raise _bad(f"{where}.type", 'must be "function"')
    function = tool.get("function")
    if not isinstance(function, dict):
      raise _bad(f"{where}.function", "must be an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise _bad(f"{where}.function.name", f"must be 1-64 letters, digits, _ or -, got {name!r}")
    if name in names:
      raise _bad(f"{where}.function.name", f"{name!r} names two tools")
    names.add(name)
    if not isinstance(function.get("description", ""), str):
      raise _bad(f"{where}.function.description", "must be a string")
    params = function.get("parameters", {})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
      raise _bad(f"{where}.function.parameters", 'must be a JSON schema of an object ({"type": "object", ...})')
  if tool_choice is None or tool_choice in ("auto", "none"):
    return tools
  if tool_choice == "required":
    if not tools:
      raise _bad("tool_choice", '"required" needs tools')
    return tools
  if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
    name = (tool_choice.get("function") or {}).get("name")
    if name not in names:
      raise _bad("tool_choice.function.name", f"{name!r} is not one of the tools")
    return tools
  raise _bad("tool_choice", f'must be "auto", "none", "required" or {{"type": "function", ...}}, got {tool_choice!r}')


def _arguments(value, field: str) -> dict:
  """A call's arguments as an object: OpenAI sends a JSON string, Hugging Face data an object."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise _bad(field, f"is not JSON ({e})") from None
  if not isinstance(value, dict):
    raise _bad(field, "must be a JSON object")
  return value


def _text(content, field: str) -> str | None:
  """A message's content as text (None stays None): a string, or a list of text parts."""
  if content is None or isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
    return "".join(str(p.get("text", "")) for p in content)
  raise _bad(field, "must be a string or a list of text parts")


def check_messages(messages) -> list[dict]:
  """Copies of the messages with text content and each call's arguments as an object; GenerationError
  naming the field for an unknown role, missing content, or a malformed tool call."""
  if not isinstance(messages, list):
    raise _bad("messages", "must be a list")
  out = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
      role = m.get("role") if isinstance(m, dict) else None
      raise _bad(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
    m = copy.deepcopy(m)
    m["content"] = _text(m.get("content"), f"{where}.content")
    calls = m.get("tool_calls")
    if calls is not None and m["role"] != "assistant":
      raise _bad(f"{where}.tool_calls", "only assistant messages carry tool calls")
    if m["content"] is None and not (m["role"] == "assistant" and calls):
      raise _bad(f"{where}.content", "is missing (only an assistant message with tool_calls may omit it)")
    if m["role"] == "tool" and not isinstance(m.get("tool_call_id", ""), str):
      raise _bad(f"{where}.tool_call_id", "must be a string")
    if calls is not None:
      if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls", "must be a list")
      for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
          raise _bad(f"{where}.tool_calls[{j}].function.name", "is missing")
        function["arguments"] = _arguments(function.get("arguments", {}), f"{where}.tool_calls[{j}].function.arguments")
    out.append(m)
  return out


def template_takes_tools(template: str | None) -> bool:
  """Whether a chat template reads a `tools` variable (then it lists the tools itself)."""
  if not template:
    return False
  return _reads_tools(template)


@functools.lru_cache(maxsize=8)  # parsed once per template, not per request
def _reads_tools(template: str) -> bool:
  import jinja2
  from jinja2 import meta

  try:
    return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
  except jinja2.TemplateSyntaxError:
    return False  # rendering reports it


def _block(call: dict) -> str:
  f = call["function"]
  return f"{BEGIN}\n{json.dumps({'name': f['name'], 'arguments': f['arguments']}, ensure_ascii=False)}\n{END}"


def _default_format(messages: list[dict], tools: list[dict]) -> list[dict]:
  """Plain {"role", "content"} messages holding the tools, calls and results as text (module docstring)."""
  out: list[dict] = []
  for m in messages:
    role, content = m["role"], m["content"] or ""
    if role == "developer":
      role = "system"
    if role == "assistant" and m.get("tool_calls"):
      content = "\n".join(([content] if content else []) + [_block(c) for c in m["tool_calls"]])
    if role == "tool":
      response = f"<tool_response>\n{content}\n</tool_response>"
      if out and out[-1].get("tool_results"):  # consecutive results share one user turn
        out[-1]["content"] += "\n" + response
        continue
      out.append({"role": "user", "content": response, "tool_results": True})
      continue
    out.append({"role": role, "content": content})
  if tools:
    listed = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0]["role"] == "system":
      out[0]["content"] = f"{out[0]['content']}\n\n{listed}" if out[0]["content"] else listed
    else:
      out.insert(0, {"role": "system", "content": listed})
  return [{"role": m["role"], "content": m["content"]} for m in out]


def render_messages(tokenizer, messages, tools=None, tool_choice=None, add_generation_prompt: bool = True) -> str:
  """The prompt text of a chat request with tools (module docstring: the tools-aware template's way or
  the default format); GenerationError naming the field for bad tools, tool_choice or messages, HFError
  when the tokenizer has no chat template."""
  tools = check_tools(tools, tool_choice)
  messages = check_messages(messages)
  listed = tools if tool_choice != "none" else []
  if template_takes_tools(tokenizer.chat_template):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=listed or None)
  return tokenizer.apply_chat_template(_default_format(messages, listed), add_generation_prompt=add_generation_prompt)


_DEFS = ("$defs", "definitions")


def _has_refs(schema) -> bool:
  if isinstance(schema, dict):
    return "$ref" in schema or any(k in schema for k in _DEFS) or any(_has_refs(v) for v in schema.values())
  return isinstance(schema, list) and any(_has_refs(v) for v in schema)


def _moved_refs(schema, name: str):
  """`schema` with its local refs pointing where `_call_schema` moves things: the root ("#") to
  $defs/NAME, a definition K to $defs/NAME.K, any other pointer under $defs/NAME."""
  if isinstance(schema, list):
    return [_moved_refs(v, name) for v in schema]
  if not isinstance(schema, dict):
    return schema
  out = {k: _moved_refs(v, name) for k, v in schema.items()}
  ref = schema.get("$ref")
  if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
    parts = ref[2:].split("/", 2) if ref != "#" else []
    if len(parts) >= 2 and parts[0] in _DEFS:
      out["$ref"] = "/".join([f"#/$defs/{name}.{parts[1]}", *parts[2:]])
    else:
      out["$ref"] = f"#/$defs/{name}" + ref[1:]
  return out


def _call_schema(tool: dict, defs: dict) -> dict:
  """The schema of one call's JSON. Parameters with refs or definitions move into the root's `defs`
  (their refs rewritten), since refs resolve from the root and this schema wraps them."""
  function = tool["function"]
  name = function["name"]
  params = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
  if _has_refs(params):
    params = _moved_refs(params, name)
    for key in _DEFS:
      for k, v in (params.pop(key, None) or {}).items():
        defs[f"{name}.{k}"] = v
    defs[name] = params
    params = {"$ref": f"#/$defs/{name}"}
  return {
    "type": "object",
    "properties": {"name": {"const": name}, "arguments": params},
    "required": ["name", "arguments"],
    "additionalProperties": False,
  }


def call_grammar(tools, tool_choice) -> dict | None:
  """The structured-output spec that forces one call block (`jaxeff.serve.grammar`'s "tagged_json"):
  the named function's, or any listed tool's for "required"; None for "auto", "none" or no choice.
  A tool without parameters takes an empty object; parameters with `$ref`s keep them working (their
  definitions move to the root's $defs as NAME and NAME.DEF)."""
  tools = check_tools(tools, tool_choice)
  if tool_choice is None or tool_choice in ("auto", "none"):
    return None
  defs: dict = {}
  if tool_choice == "required":
    schemas = [_call_schema(t, defs) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
  else:
    name = tool_choice["function"]["name"]
    schema = _call_schema(next(t for t in tools if t["function"]["name"] == name), defs)
  if defs:
    schema = {**schema, "$defs": defs}
  return {"type": "tagged_json", "begin": BEGIN + "\n", "schema": schema, "end": "\n" + END}


def _parse_block(body: str) -> dict | None:
  """An OpenAI tool call from a block's JSON, or None when it is not {"name": str, "arguments": object}."""
  try:
    value = json.loads(body)
  except json.JSONDecodeError:
    return None
  if not isinstance(value, dict) or not isinstance(value.get("name"), str):
    return None
  args = value.get("arguments", {})
  if isinstance(args, str):  # some models write the arguments as a JSON string
    try:
      args = json.loads(args)
    except json.JSONDecodeError:
      return None
  if not isinstance(args, dict):
    return None
  return {
    "id": f"call_{secrets.token_hex(12)}",
    "type": "function",
    "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)},
  }


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
  """(content, tool calls) of a reply: each `<tool_call>JSON</tool_call>` block that parses becomes
  an OpenAI call {"id": "call_<hex>", "type": "function", "function": {"name", "arguments": JSON
  string}}; the rest of the text, stripped, is the content (None when empty and there are calls)."""
  calls, kept, at = [], [], 0
  for match in _BLOCK.finditer(text):
    call = _parse_block(match.group(1))
    if call is None:
      continue  # not a call: the block stays in the content
    kept.append(text[at : match.start()])
    at = match.end()
    calls.append(call)
  kept.append(text[at:])
  content = "".join(kept).strip()
  return (content or None) if calls else content, calls


def _partial_tag(text: str, tag: str) -> int:
  """The length of the longest end of `text` that begins `tag` (what may be the start of a tag)."""
  for n in range(min(len(text), len(tag) - 1), 0, -1):
    if tag.startswith(text[-n:]):
      return n
  return 0


class ToolCallStream:
  """`parse_tool_calls` for a streamed reply: `push` each decoded piece, `finish` at the end; each
  returns OpenAI deltas, {"content": str} or {"tool_calls": [{"index", "id", "type", "function":
  {"name", "arguments"}}]} (one per call, sent whole once its block closes).

  Content streams as it comes, except what may begin a `<tool_call>` tag and trailing whitespace
  (sent once more text follows), and leading whitespace is dropped: the content deltas join to
  exactly `parse_tool_calls`'s content. A block that does not parse is content; so is an unclosed
  one at `finish`."""

  def __init__(self):
    self._buf = ""  # text not yet sent: outside a block, or the open block's body
    self._in_block = False
    self._space = ""  # whitespace held back after the last content sent
    self._started = False  # some content was sent (leading whitespace is dropped before)
    self._calls = 0

  def _content(self, text: str, out: list[dict]) -> None:
    if not self._started:
      text = text.lstrip()
    text = self._space + text
    body = text.rstrip()
    self._space = text[len(body) :]
    if body:
      self._started = True
      out.append({"content": body})

  def push(self, piece: str) -> list[dict]:
    """The deltas that `piece` (the next decoded text) completes."""
    out: list[dict] = []
    self._buf += piece
    while True:
      if self._in_block:
        end = self._buf.find(END)
        if end < 0:
          return out
        body, self._buf, self._in_block = self._buf[:end], self._buf[end + len(END) :], False
        call = _parse_block(body)
        if call is None:
          self._content(BEGIN + body + END, out)
        else:
          out.append({"tool_calls": [{"index": self._calls, **call}]})
          self._calls += 1
        continue
      begin = self._buf.find(BEGIN)
      if begin < 0:
        keep = _partial_tag(self._buf, BEGIN)
        self._content(self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep :]
        return out
      self._content(self._buf[:begin], out)
      self._buf, self._in_block = self._buf[begin + len(BEGIN) :], True

  def finish(self) -> list[dict]:
    """The deltas of what was held back: a partial tag or an unclosed block, as content."""
    out: list[dict] = []
    rest = (BEGIN if self._in_block else "") + self._buf
    self._buf, self._in_block = "", False
    self._content(rest, out)
    return out
