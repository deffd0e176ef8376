"""Real tokenizers and chat layouts: what a Hugging Face model sees, as exact token ids.

`ChatTokenizer` wraps a `tokenizers.Tokenizer` (the `tokenizer.json` of a checkpoint) and a
`ChatLayout` (ChatML for Qwen, or Llama 3), and implements the `vocab.TokenizerAdapter`
protocol the rollout, the environments and `render_trajectory` use::

    tok = ChatTokenizer.from_dir("/ckpt/Qwen2.5-0.5B-Instruct")         # layout detected
    prompt = tok.prompt_ids("What is 12 * 34?", system="...", tools=[calculator.schema])
    reply = tok.tool_reply_ids(["408"])       # what the environment appends after a tool call

The conversation as one token stream (ChatML shown; `\\n` is a newline)::

    prompt  <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
            <|im_start|>assistant\\n
    turn 0  <tool_call>\\n{"name": "calculator", "arguments": {...}}\\n</tool_call><|im_end|>
    reply 0 \\n<|im_start|>user\\n<tool_response>\\n408\\n</tool_response><|im_end|>\\n
            <|im_start|>assistant\\n
    turn 1  The answer is <answer>408</answer><|im_end|>

The policy samples turn content and the end-of-turn token (`<|im_end|>`, Llama 3 `<|eot_id|>`);
everything else - the separator after end-of-turn that the model never emits itself, the role
header, the tool response wrapper, the header that opens the next assistant turn - is the
environment's reply, appended as these exact pieces and never by re-rendering the history.
Tool calls follow the Hermes convention `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(Qwen2.5 / Qwen3 are trained on it; for Llama 3 it is the same text in the assistant turn, and
tool results come back as `ipython` messages).

Prompts are rendered by the checkpoint's own Jinja chat template when it has one (the text
the model was trained on: its system prompt, its tool listing), the way transformers'
`apply_chat_template` renders it; without a template, by the layout (`render_layout`). A
test pins both: the trajectory of a multi-turn rollout equals the tokens of the chat template
applied to the same conversation, and `loss_mask` covers exactly the assistant's tokens.

Token ids and the rollout's contract: trajectories are padded with id 0 (`pad_id`, as for
symbol vocabularies), which in a real tokenizer is also a real token: use `loss_mask`, `turn`
and `turn_end`, not token values, to find padding. Ids the policy must never sample
(`never_sampled_ids`: role headers, begin-of-text, the padding/end-of-text token, and ids
beyond the tokenizer's vocabulary that the model's embedding may still have) are masked out of
the sampling distribution. Text from outside the template (a tool's result, the model's words
quoted in an error message) goes through `plain(text)`, which removes the strings of the
`protected_tokens` (special tokens, the template's added tokens), so that it is tokenized as
plain text and can never become a role header or an end-of-turn.

Environment symbols: `symbol_ids(symbol)` maps a `vocab.Vocab` symbol (`<eot>`, `<user>`, a
word, a digit) to its token sequence under this tokenizer and layout, so the pure-JAX
environments can talk to a real model (`envs.json_tool.TokenizedEnv`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.optional import require


@dataclasses.dataclass(frozen=True)
class ChatLayout:
  """The template pieces of one chat format.

  Attributes:
    name: "chatml" | "llama3".
    bos: text that starts a conversation ("" for ChatML).
    header: role header, `header.format(role=...)`.
    eot: end-of-turn token; the policy's turn ends when it samples it.
    sep: text after an end-of-turn that the model never emits (ChatML "\\n", Llama 3 "").
    tool_header / tool_item / tool_footer: a tool message with results `c1, c2, ...` is
      `tool_header + tool_item.format(c1) + ... + tool_footer`.
    tool_role: the role whose header carries tool results ("user" in ChatML, Qwen's
      convention; "ipython" in Llama 3).
    required: special tokens that must be single tokens of the tokenizer.
    banned: special tokens the policy must never sample (those the tokenizer has).
  """

  name: str
  bos: str
  header: str
  eot: str
  sep: str
  tool_header: str
  tool_item: str
  tool_footer: str
  tool_role: str
  required: tuple[str, ...]
  banned: tuple[str, ...]

  def message(self, role: str, content: str) -> str:
    """One complete message, separator included."""
    return self.header.format(role=role) + content + self.eot + self.sep

  def tool_message(self, contents: Sequence[str]) -> str:
    """One tool-result message (several results of one turn's calls), separator included."""
    return (self.tool_header + "".join(self.tool_item.format(content=c) for c in contents)
            + self.tool_footer + self.sep)

  def reply(self, role: str, contents: Sequence[str]) -> str:
    """What the environment appends after the policy's end-of-turn: the separator, the
    message (`role` "tool" or "user"), and the header of the next assistant turn."""
    body = (self.tool_message(contents) if role == "tool"
            else self.message(role, "\n".join(contents)))
    return self.sep + body + self.header.format(role="assistant")


CHATML = ChatLayout(
    name="chatml", bos="", header="<|im_start|>{role}\n", eot="<|im_end|>", sep="\n",
    tool_header="<|im_start|>user", tool_item="\n<tool_response>\n{content}\n</tool_response>",
    tool_footer="<|im_end|>", tool_role="user", required=("<|im_start|>", "<|im_end|>"),
    banned=("<|im_start|>", "<|endoftext|>"))

LLAMA3 = ChatLayout(
    name="llama3", bos="<|begin_of_text|>",
    header="<|start_header_id|>{role}<|end_header_id|>\n\n", eot="<|eot_id|>", sep="",
    tool_header="", tool_item="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
    tool_footer="", tool_role="ipython",
    required=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    banned=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>",
            "<|finetune_right_pad_id|>"))

LAYOUTS = {"chatml": CHATML, "llama3": LLAMA3}

HERMES_TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


class TemplateError(ValueError):
  """A tokenizer that lacks a piece of its chat layout, or an unknown layout."""


class ChatTokenizer:
  """A real tokenizer plus a chat layout; a `vocab.TokenizerAdapter` (see module docstring)."""

  pad_id = V.PAD_ID  # the rollout's fill id (see the module docstring)

  def __init__(self, tokenizer, layout: ChatLayout | str = "auto",
               chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None):
    """tokenizer: a `tokenizers.Tokenizer`; layout: a `ChatLayout`, "chatml", "llama3" or
    "auto" (from the special tokens the tokenizer has); chat_template: Jinja source used for
    prompts (None: the layout renders them); special_tokens: bos/eos token strings passed to
    the template."""
    self.tokenizer = tokenizer
    if isinstance(layout, str):
      layout = self._detect(tokenizer) if layout == "auto" else LAYOUTS.get(layout)
      if layout is None:
        raise TemplateError(f"unknown chat layout; expected one of {sorted(LAYOUTS)} or 'auto'")
    self.layout = layout
    missing = [t for t in layout.required if tokenizer.token_to_id(t) is None]
    if missing:
      raise TemplateError(f"the tokenizer lacks the {layout.name} template token(s) {missing}; "
                          "they must be single (added) tokens")
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})
    self.eot_id = int(tokenizer.token_to_id(layout.eot))
    self.size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self._compiled = None
    self._protected = None  # (ids -> text, regex), built on first use

  @staticmethod
  def _detect(tokenizer) -> ChatLayout:
    for layout in (CHATML, LLAMA3):
      if all(tokenizer.token_to_id(t) is not None for t in layout.required):
        return layout
    raise TemplateError("cannot detect the chat layout: the tokenizer has neither the ChatML "
                        f"tokens {list(CHATML.required)} nor the Llama 3 tokens "
                        f"{list(LLAMA3.required)}; pass layout=")

  @classmethod
  def from_dir(cls, path: str | os.PathLike, layout: ChatLayout | str = "auto",
               use_chat_template: bool = True) -> "ChatTokenizer":
    """From a checkpoint directory: `tokenizer.json`, and the chat template from
    `tokenizer_config.json` / `chat_template.jinja` when `use_chat_template`."""
    tokenizers = require("tokenizers")
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} does not exist (a fast-tokenizer tokenizer.json is "
                              "needed; slow sentencepiece-only tokenizers are not read)")
    tok = tokenizers.Tokenizer.from_file(file)
    template, special = None, {}
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        tc = json.load(f)
      template = tc.get("chat_template")
      for k in ("bos_token", "eos_token", "pad_token"):
        v = tc.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
          special[k] = v
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # named templates: take "default"
      template = {t["name"]: t["template"] for t in template}.get("default")
    return cls(tok, layout, template if use_chat_template else None, special)

  # --- TokenizerAdapter -------------------------------------------------------------------
  def encode(self, text: str | Sequence[str]) -> list[int]:
    """Text -> ids, special-token strings in the text becoming their tokens, nothing added
    (no BOS: templates write it). A list of strings is encoded piece by piece."""
    if not isinstance(text, str):
      return [i for piece in text for i in self.encode(piece)]
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int], *, skip_pad: bool = False) -> str:
    """Ids -> text with special tokens kept. `skip_pad` drops id 0 (the fill id; with a real
    tokenizer it is also a real token, so it is off by default)."""
    ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray)
                                      else ids).reshape(-1)]
    if skip_pad:
      ids = [i for i in ids if i != self.pad_id]
    ids = [i for i in ids if 0 <= i < self.size]
    return self.tokenizer.decode(ids, skip_special_tokens=False)

  def __contains__(self, symbol: str) -> bool:
    """True if `symbol` is a single token (e.g. `<think>`), or `<eot>`."""
    return symbol == V.EOT or self.tokenizer.token_to_id(symbol) is not None

  def id(self, symbol: str) -> int:
    """The id of a single-token symbol (`<eot>` is the layout's end-of-turn)."""
    if symbol == V.EOT:
      return self.eot_id
    i = self.tokenizer.token_to_id(symbol)
    if i is None:
      raise KeyError(f"{symbol!r} is not a single token of this tokenizer")
    return int(i)

  def ids(self, symbols: Iterable[str]) -> list[int]:
    return [self.id(s) for s in symbols]

  def missing(self, symbols: Iterable[str]) -> list[str]:
    return [s for s in dict.fromkeys(symbols) if s not in self]

  def never_sampled_ids(self) -> list[int]:
    """Ids the policy must never emit: the layout's banned special tokens (those present)."""
    out = [self.tokenizer.token_to_id(t) for t in self.layout.banned]
    return sorted({int(i) for i in out if i is not None})

  def protected_tokens(self) -> dict[int, str]:
    """Added tokens that text from outside the template (a tool result, the model's words
    quoted in an error message) must never produce: `{id: text}`. They are the tokens flagged
    special, the layout's required and banned ones, and every added token of the tool reply
    frame (`<tool_response>`, `</tool_response>`), special or not. Other added tokens that are
    not special (`<tool_call>`, `<think>`) are ordinary text here."""
    if self._protected is None:
      L = self.layout
      frame = L.reply("tool", [""])
      tokens = {int(i): t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()
                if t.special or t.content in frame or t.content in L.required + L.banned}
      texts = sorted(set(tokens.values()), key=len, reverse=True)
      self._protected = tokens, re.compile("|".join(map(re.escape, texts))) if texts else None
    return dict(self._protected[0])

  def plain(self, text: str) -> str:
    """`text` with every `protected_tokens` string removed, repeatedly until none is left (so
    removing one cannot join its neighbours into another): `encode(plain(text))` holds none
    of their ids, for tokens matched on the raw text (`normalized=False`, as special tokens
    are). `JsonToolEnv` still checks its replies' ids, since a token could in principle span
    the text and the template piece next to it."""
    self.protected_tokens()
    pattern = self._protected[1]
    while pattern is not None:
      text, n = pattern.subn("", text)
      if not n:
        break
    return text

  # --- chat pieces ------------------------------------------------------------------------
  def render_layout(self, messages: Sequence[Mapping[str, str]],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> str:
    """A conversation rendered by the layout alone (no Jinja). Tools are listed Hermes-style in
    the system message; tool messages with consecutive results are merged as ChatML does."""
    L = self.layout
    msgs = [dict(m) for m in messages]
    if tools:
      listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
      if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] += HERMES_TOOLS_PROMPT.format(tools=listing)
      else:
        msgs.insert(0, {"role": "system",
                        "content": HERMES_TOOLS_PROMPT.format(tools=listing).lstrip("\n")})
    out, i = [L.bos], 0
    while i < len(msgs):
      if msgs[i]["role"] == "tool":
        j = i
        while j < len(msgs) and msgs[j]["role"] == "tool":
          j += 1
        out.append(L.tool_message([m["content"] for m in msgs[i:j]]))
        i = j
        continue
      out.append(L.message(msgs[i]["role"], msgs[i]["content"]))
      i += 1
    if add_generation_prompt:
      out.append(L.header.format(role="assistant"))
    return "".join(out)

  def render(self, messages: Sequence[Mapping[str, str]],
             tools: Sequence[Mapping[str, Any]] | None = None,
             add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The conversation as text: the checkpoint's chat template if it has one (rendered like
    transformers' `apply_chat_template`), else `render_layout`."""
    if self.chat_template is None:
      return self.render_layout(messages, tools, add_generation_prompt)
    if self._compiled is None:
      self._compiled = _compile_template(self.chat_template)
    return self._compiled.render(
        messages=[dict(m) for m in messages], tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        **{**self.special_tokens, **template_kwargs})

  def prompt_ids(self, question: str, system: str | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs) -> list[int]:
    """Token ids of `[system,] user(question)` and the header that opens the assistant turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    return self.encode(self.render(messages, tools, True, **template_kwargs))

  def reply_ids(self, role: str, contents: Sequence[str]) -> list[int]:
    """Ids of the environment's reply after an end-of-turn (see `ChatLayout.reply`)."""
    return self.encode(self.layout.reply(role, contents))

  def tool_reply_ids(self, contents: Sequence[str]) -> list[int]:
    return self.reply_ids("tool", contents)

  def fit_reply(self, role: str, contents: Sequence[str], budget: int,
                marker: str = " ...") -> tuple[list[int], bool]:
    """`reply_ids` cut to at most `budget` tokens by shortening the contents (each result
    keeps an equal share; `marker` shows the cut). Returns (ids, was_cut). The template pieces
    are never cut; raises ValueError if even empty contents do not fit."""
    ids = self.reply_ids(role, contents)
    if len(ids) <= budget:
      return ids, False
    if len(self.reply_ids(role, [""] * len(contents))) > budget:
      raise ValueError(f"the {self.layout.name} reply frame alone needs "
                       f"{len(self.reply_ids(role, [''] * len(contents)))} tokens; the reply "
                       f"budget is {budget}")
    lo, hi = 0, max(len(c) for c in contents)  # characters kept per content
    while lo < hi:
      mid = (lo + hi + 1) // 2
      cut = [c if len(c) <= mid else c[:mid] + marker for c in contents]
      if len(self.reply_ids(role, cut)) <= budget:
        lo = mid
      else:
        hi = mid - 1
    cut = [c if len(c) <= lo else c[:lo] + marker for c in contents]
    ids = self.reply_ids(role, cut)
    if len(ids) > budget:  # the marker itself does not fit: cut without it
      cut = [c[:lo] for c in contents]
      ids = self.reply_ids(role, cut)
    return ids, True

  # --- environment symbols ------------------------------------------------------------------
  def symbol_ids(self, symbol: str, *, eot_sep: bool = True) -> list[int]:
    """Token ids of one `vocab.Vocab` symbol as it appears in a conversation.

    The chat-structure symbols are template pieces: `<eot>` the end-of-turn (followed by the
    separator when `eot_sep`: in a reply; the policy's own turn ends at the end-of-turn),
    `<user>`/`<assistant>`/`<system>` role headers, `<tool>` the header of the tool role,
    `<bos>` the begin-of-text, `<pad>` nothing. Every other symbol (a word, a digit, `<call>`)
    is its text after a space, so that a decoded stream splits back into the symbols on
    whitespace. E.g. the symbol reply `<tool> 4 0 8 <eot> <assistant>` becomes a tool-role
    message and the next assistant header.
    """
    L = self.layout
    pieces = {V.PAD: "", V.BOS: L.bos, V.EOT: L.eot + (L.sep if eot_sep else ""),
              V.USER: L.header.format(role="user"),
              V.ASSISTANT: L.header.format(role="assistant"),
              V.SYSTEM: L.header.format(role="system"),
              V.TOOL: L.header.format(role=L.tool_role)}
    if symbol in pieces:
      return self.encode(pieces[symbol])
    return self.encode(" " + symbol)

  def symbol_table(self, vocab: V.Vocab, *, eot_sep: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`symbol_ids` of every symbol of `vocab`: (ids [S, L] int32 right-padded, lengths [S]
    int32), so that a symbol stream is written in real tokens by a gather (static shapes)."""
    rows = [self.symbol_ids(s, eot_sep=eot_sep) for s in vocab.symbols]
    width = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return ids, np.asarray([len(r) for r in rows], np.int32)


def _compile_template(source: str):
  """Jinja environment as transformers builds it for chat templates (sandboxed, trim/lstrip
  blocks, loop controls, a `tojson` that does not HTML-escape, `raise_exception`,
  `strftime_now`)."""
  jinja2 = require("jinja2")
  sandbox = require("jinja2.sandbox")
  ext = require("jinja2.ext")

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env.from_string(source)
