"""Symbol vocabulary for pure-JAX environments.

A pure-JAX environment speaks in *symbols*: whole words, digits, operators and a fixed set of
control tokens. Each symbol is one token id. The vocabulary is the special tokens below
followed by the symbols the environments declare (in declaration order, duplicates dropped),
so ids are stable for a given list of environments.

Chat layout (the same shape as ChatML / Llama-3 templates, one token per piece)::

    prompt : <bos> <user> what is 12 * 34 ? <eot> <assistant>
    turn 0 : <call> calc 12 * 34 </call> <eot>                  # sampled by the policy
    reply 0: <tool> 408 <eot> <assistant>                       # written by the environment
    turn 1 : <answer> 408 </answer> <eot>                       # sampled by the policy

The role header that opens the next assistant turn is part of the environment's reply, as the
separator a chat template inserts and the model never emits itself: the policy only ever
samples turn content and the end-of-turn token.

Seam for real tokenizers: `TokenizerAdapter` is the interface the rollout and the renderer
need. `Vocab` implements it with one id per symbol; the Hugging Face adapter
(`mtrl_jax.models.chat.ChatTokenizer`) speaks a real tokenizer's ids with the model's chat
template, and maps each symbol to a token *sequence* (`symbol_ids`, `symbol_table`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol, Sequence

import numpy as np

PAD = "<pad>"
BOS = "<bos>"
EOT = "<eot>"  # end of turn: the one token that ends an agent turn
SYSTEM = "<system>"
USER = "<user>"
ASSISTANT = "<assistant>"
TOOL = "<tool>"
CALL_OPEN = "<call>"
CALL_CLOSE = "</call>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ASK = "<ask>"
ERROR = "<error>"
UNK = "<unk>"

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, BOS, EOT, SYSTEM, USER, ASSISTANT, TOOL, CALL_OPEN, CALL_CLOSE,
    ANSWER_OPEN, ANSWER_CLOSE, THINK_OPEN, THINK_CLOSE, ASK, ERROR, UNK,
)
ROLE_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, TOOL)

PAD_ID = 0  # fixed: padding is id 0 in every vocabulary built here
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))


class TokenizerAdapter(Protocol):
  """What the rollout, the environments' wrappers and the renderer need from a tokenizer.

  Also used: `size` (ids >= size are never sampled), `symbol in adapter` / `id(symbol)` for
  single-token control symbols (`<think>`), and optionally `never_sampled_ids()`.
  """

  pad_id: int
  eot_id: int

  def encode(self, text: str | Sequence[str]) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A symbol-level vocabulary: `symbols[i]` is the text of token id `i`.

  Build one with `Vocab.build(*symbol_lists)`; the special tokens always come first, so
  `<pad>` is id 0 and control-token ids do not depend on the environments.
  """

  symbols: tuple[str, ...]

  def __post_init__(self):
    if self.symbols[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
      raise ValueError("Vocab.symbols must start with SPECIAL_TOKENS; use Vocab.build().")
    if len(set(self.symbols)) != len(self.symbols):
      dup = sorted({s for s in self.symbols if self.symbols.count(s) > 1})
      raise ValueError(f"Vocab.symbols has duplicates: {dup}")
    bad = [s for s in self.symbols if not s or any(c.isspace() for c in s)]
    if bad:
      raise ValueError(f"symbols must be non-empty and contain no whitespace, got {bad!r}")
    object.__setattr__(self, "_ids", {s: i for i, s in enumerate(self.symbols)})

  @classmethod
  def build(cls, *symbol_lists: Iterable[str]) -> "Vocab":
    """Special tokens followed by the given symbols, in order, duplicates dropped."""
    seen = dict.fromkeys(SPECIAL_TOKENS)
    for symbols in symbol_lists:
      for s in symbols:
        seen.setdefault(s)
    return cls(tuple(seen))

  def __len__(self) -> int:
    return len(self.symbols)

  @property
  def size(self) -> int:
    return len(self.symbols)

  def __contains__(self, symbol: str) -> bool:
    return symbol in self._ids

  def id(self, symbol: str) -> int:
    """Token id of one symbol; raises KeyError naming it if it is not in the vocabulary."""
    try:
      return self._ids[symbol]
    except KeyError:
      raise KeyError(f"symbol {symbol!r} is not in the vocabulary ({self.size} symbols)") from None

  def ids(self, symbols: Iterable[str]) -> list[int]:
    return [self.id(s) for s in symbols]

  def missing(self, symbols: Iterable[str]) -> list[str]:
    """The symbols not in this vocabulary, in order (for error messages)."""
    return [s for s in dict.fromkeys(symbols) if s not in self._ids]

  # --- TokenizerAdapter -------------------------------------------------------------------
  pad_id = PAD_ID

  @property
  def eot_id(self) -> int:
    return self._ids[EOT]

  @property
  def bos_id(self) -> int:
    return self._ids[BOS]

  def encode(self, text: str | Sequence[str]) -> list[int]:
    """Whitespace-separated text (or a list of symbols) -> token ids."""
    symbols = text.split() if isinstance(text, str) else list(text)
    return self.ids(symbols)

  def decode(self, ids: Iterable[int], *, skip_pad: bool = True) -> str:
    """Token ids -> space-separated symbols. Out-of-range ids render as `<?id>`."""
    out = []
    for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
      i = int(i)
      if skip_pad and i == PAD_ID:
        continue
      out.append(self.symbols[i] if 0 <= i < self.size else f"<?{i}>")
    return " ".join(out)

  def encode_padded(self, text: str | Sequence[str], length: int) -> tuple[np.ndarray, int]:
    """Encode and right-pad with `<pad>` to `length`: (ids [length] int32, n)."""
    ids = self.encode(text)
    if len(ids) > length:
      raise ValueError(f"{len(ids)} tokens do not fit in length {length}: {text!r}")
    out = np.full((length,), PAD_ID, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)


def render_trajectory(traj, vocab: TokenizerAdapter, row: int = 0, *, color: bool = False) -> str:
  """Render one row of a `Trajectory` as a conversation, one segment per line.

  Tokens the policy sampled (`loss_mask` True: they are trained on) are shown after `▶`;
  everything else - prompt, tool/user replies, forced tokens - after `│`, so it is visible at
  a glance which tokens enter the loss. Padding is not shown. With `color=True`, sampled
  tokens are additionally bold and context dim (ANSI escapes).

  Example::

      prompt   │ <bos> <user> what is 12 * 34 ? <eot> <assistant>
      agent 0  ▶ <call> calc 12 * 34 </call> <eot>
      reply 0  │ <tool> 408 <eot> <assistant>
      agent 1  ▶ <answer> 408 </answer> <eot>      reward 1.0
  """
  tokens = np.asarray(traj.tokens[row])
  mask = np.asarray(traj.loss_mask[row])
  turn = np.asarray(traj.turn[row])
  reward = np.asarray(traj.turn_reward[row])
  valid = np.asarray(traj.turn_valid[row])
  n = int(np.max(np.nonzero(tokens != vocab.pad_id)[0], initial=-1)) + 1

  segments: list[tuple[str, bool, list[int]]] = []  # (label, trained, ids)
  seen_turn = -1
  for t in range(n):
    trained = bool(mask[t])
    if turn[t] >= 0:
      seen_turn = max(seen_turn, int(turn[t]))
    if turn[t] >= 0:
      label = f"agent {turn[t]}"
    elif seen_turn < 0:
      label = "prompt"
    else:
      label = f"reply {seen_turn}"
    if segments and segments[-1][0] == label and segments[-1][1] == trained:
      segments[-1][2].append(int(tokens[t]))
    else:
      segments.append((label, trained, [int(tokens[t])]))

  lines = []
  for label, trained, ids in segments:
    text = vocab.decode(ids, skip_pad=False)
    if color:
      text = f"\033[1m{text}\033[0m" if trained else f"\033[2m{text}\033[0m"
    line = f"{label:<9}{'▶' if trained else '│'} {text}"
    if trained and label.startswith("agent "):
      k = int(label.split()[1])
      if k < reward.shape[0] and valid[k] and reward[k] != 0:
        line += f"      reward {float(reward[k]):g}"
    lines.append(line)
  status = []
  if bool(np.asarray(traj.done[row])):
    status.append("done")
  if bool(np.asarray(traj.truncated[row])):
    status.append("truncated")
  lines.append(f"[{', '.join(status) or 'running'}; return {float(np.sum(reward * valid)):g}]")
  return "\n".join(lines)
