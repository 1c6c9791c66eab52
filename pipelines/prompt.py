"""A1111 prompt syntax and A1111-exact text conditioning for diffusers pipelines.

Users paste prompts written for AUTOMATIC1111 (v1.10), so every rule here follows its source:
`modules/prompt_parser.py` (attention syntax, BREAK), `modules/extra_networks.py` and
`extensions-builtin/Lora` (`<lora:...>` tags), `modules/processing_scripts/comments.py`
(`#` comments), `modules/sd_hijack_clip.py` / `sd_hijack_open_clip.py` / `sd_emphasis.py`
(75-token chunks, weights, clip skip) and `modules/sd_models_xl.py` (SDXL).

The engine applies the steps in A1111's order:

1. `strip_comments` on the prompt and the negative prompt;
2. `parse_extra_networks` / `extract_lora_tags` on the prompt only (A1111 leaves tags in the
   negative prompt, where CLIP reads them as text);
3. `PromptEncoder.encode` on both (`negative=True` for the negative prompt), with the
   textual-inversion embeddings that fit the model (`EmbeddingLookup`: names matched on
   token ids as `modules/textual_inversion`'s `find_embedding_at_position`, vectors put in
   place of the token embeddings as `modules/sd_hijack.py`'s `EmbeddingsWithFixes`);
4. `pad_to_same_length`, then `pipe(prompt_embeds=..., negative_prompt_embeds=...,
   pooled_prompt_embeds=..., negative_pooled_prompt_embeds=...)`.

Not handled here (A1111 features outside this module): prompt editing `[a:b:when]`,
alternation `[a|b]` and `AND` (composable diffusion), in `prompt_grammar`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.lora.weights import (
    REGION_KEYS,
    BlockWeights,
    Weight,
    WeightSchedule,
    parse_weight,
    preset_names,
    weight_text,
)
from pipelines.prompt_grammar import prompt_schedules, split_and
from pipelines.schema import LoraSpec

# ---------------------------------------------------------------------------------------------
# 1. Attention syntax: (word), [word], (word:1.2), BREAK
# ---------------------------------------------------------------------------------------------

# prompt_parser.re_attention as of A1111 1.6+ (spaces allowed around the weight).
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND = 1.1
_SQUARE = 1 / 1.1

BREAK = ("BREAK", -1.0)
"""The fragment `parse_prompt_attention` emits for the BREAK keyword (A1111's marker)."""


def parse_prompt_attention(text: str, *, field: str = "prompt") -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments exactly as A1111's parser does.

    `(a)` multiplies by 1.1, `[a]` divides by 1.1, `(a:1.3)` multiplies by 1.3, nesting
    multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals, unclosed brackets apply to the end,
    stray closers are text, `BREAK` becomes `("BREAK", -1.0)`, and neighbours with equal
    weights merge. A weight A1111 cannot read (`(a:1.2.3)`) raises InvalidRequestError
    naming `field`, where A1111 itself would fail the whole generation.

    Example:
        >>> parse_prompt_attention("a (cat:1.2) [dog]")
        [('a ', 1.0), ('cat', 1.2), (' ', 1.0), ('dog', 0.9090909090909091)]
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for match in _RE_ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _parse_weight(weight, token, field))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for start in round_brackets:
        multiply_range(start, _ROUND)
    for start in square_brackets:
        multiply_range(start, _SQUARE)

    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(str(t), float(w)) for t, w in merged]


def _parse_weight(weight: str, token: str, field: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise InvalidRequestError(
            f"{field}: cannot read the attention weight in {token!r}; write e.g. (word:1.2)",
            field=field,
        ) from None


# ---------------------------------------------------------------------------------------------
# 2. Comments and extra-network tags
# ---------------------------------------------------------------------------------------------

_RE_LINE_COMMENT = re.compile("(^|\n)#[^\n]*(\n|$)")
_RE_TAIL_COMMENT = re.compile("#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """Remove `# ...` comments as A1111 ≥ 1.8 does by default (`enable_prompt_comments`).

    A1111 strips them from the prompt and the negative prompt before anything else, so a tag
    inside a comment is never applied.
    """
    return _RE_TAIL_COMMENT.sub("\n", _RE_LINE_COMMENT.sub("\n", text))


_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_KINDS = ("lora", "lyco")
"""Tag names that mean a LoRA (A1111 registers `lyco` as an alias of `lora`; case matters)."""


@dataclass(frozen=True)
class ExtraNetworks:
    """A prompt with its extra-network tags taken out.

    `text` is what the text encoder sees (A1111 replaces each tag by nothing and leaves the
    spaces around it). `loras` has one entry per LoRA tag, in A1111's application order;
    `ignored` holds the other tags (`<hypernet:...>`, unknown or mis-cased names), which
    A1111 also strips and skips.
    """

    text: str
    loras: tuple[LoraSpec, ...]
    ignored: tuple[str, ...]


def parse_extra_networks(prompt: str) -> ExtraNetworks:
    """Strip every `<name:...>` tag from `prompt` and read the LoRA ones (A1111 rules).

    `<lora:NAME>` is weight 1; `<lora:NAME:M>` sets text encoder and UNet to M;
    `<lora:NAME:TE:UNET>` sets them apart (text encoder first); `te=` and `unet=` override
    them, and a `te=` without a UNet value also sets the UNet (as in A1111); `dyn=` or a
    fourth value is checked like A1111 does and otherwise ignored. Extensions' forms:
    any multiplier may be loractl keyframes (`0@0,1@0.5`), `hr=`/`hrte=`/`hrunet=` set
    the hires pass's, `in=`/`mid=`/`out=` (SD.Next) or `lbw=` (lora-block-weight) set
    block weights. Other `key=value` items are ignored, as A1111 does, except
    lora-block-weight's `lbwe=`/`start=`/`stop=`/`step=`, which are refused. A malformed
    value raises InvalidRequestError(field="prompt") quoting the tag.

    Example:
        >>> parsed = parse_extra_networks("a cat <lora:ink:0.8>, <hypernet:x:1>")
        >>> parsed.text, parsed.loras, parsed.ignored
        ('a cat , ', (LoraSpec(name='ink', weight=0.8, te_weight=None, ...),), ('<hypernet:x:1>',))
    """
    found: list[tuple[str, str]] = []

    def remove(match: re.Match[str]) -> str:
        found.append((match.group(1), match.group(0)))
        return ""

    text = _RE_EXTRA_NET.sub(remove, prompt)
    lora_tags = [(kind, tag) for kind, tag in found if kind in LORA_TAG_KINDS]
    # A1111 groups the arguments by extra network, in order of each kind's first appearance.
    kind_order: dict[str, int] = {}
    for kind, _ in lora_tags:
        kind_order.setdefault(kind, len(kind_order))
    lora_tags.sort(key=lambda item: kind_order[item[0]])
    return ExtraNetworks(
        text=text,
        loras=tuple(_lora_from_tag(tag) for _, tag in lora_tags),
        ignored=tuple(tag for kind, tag in found if kind not in LORA_TAG_KINDS),
    )


_UNSUPPORTED_KEYS = {
    "lbwe": "lora-block-weight's elemental weights are not supported",
    "start": "use keyframes instead, e.g. 0@4,1@5 to start at the fifth step",
    "stop": "use keyframes instead, e.g. 1@10,0@11 to stop after the tenth step",
    "step": "use keyframes instead, e.g. 0@4,1@5,1@10,0@11",
}


def _lora_from_tag(tag: str) -> LoraSpec:
    """One `<lora:...>` tag to a LoraSpec, as extra_networks_lora.activate reads it, with
    loractl's keyframes and hr forms and SD.Next's / lora-block-weight's block weights."""
    items = tag[1:-1].split(":")[1:]
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        parts = item.split("=", 2)  # ExtraNetworkParams: "a=b" is named, "a=b=c" positional
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise InvalidRequestError(f"prompt: {tag} names no LoRA", field="prompt")
    for key, why in _UNSUPPORTED_KEYS.items():
        if key in named:
            raise InvalidRequestError(
                f"prompt: {tag}: {key}= is not supported; {why}", field="prompt"
            )

    def weight(value: str) -> Weight:
        if value in preset_names():
            raise InvalidRequestError(
                f"prompt: {tag} has the multiplier {value!r}; block weight presets are "
                f"written lbw={value}",
                field="prompt",
            )
        return parse_weight(value, tag)

    te = weight(positional[1]) if len(positional) > 1 else 1.0
    te = weight(named["te"]) if "te" in named else te
    unet = weight(positional[2]) if len(positional) > 2 else te
    unet = weight(named["unet"]) if "unet" in named else unet
    for dyn in ([positional[3]] if len(positional) > 3 else []) + (
        [named["dyn"]] if "dyn" in named else []
    ):
        try:
            int(dyn)
        except ValueError:
            raise InvalidRequestError(
                f"prompt: {tag} has the dyn value {dyn!r}; expected an integer",
                field="prompt",
            ) from None
    # loractl: hr= sets both hires weights; hrunet=/hrte= override it
    hr_unet = hr_te = weight(named["hr"]) if "hr" in named else None
    hr_unet = weight(named["hrunet"]) if "hrunet" in named else hr_unet
    hr_te = weight(named["hrte"]) if "hrte" in named else hr_te
    return LoraSpec(
        name=positional[0],
        weight=unet,
        te_weight=None if te == unet else te,
        blocks=_blocks_from_tag(tag, named),
        hr_weight=hr_unet,
        hr_te_weight=hr_te,
    )


def _blocks_from_tag(tag: str, named: dict[str, str]) -> BlockWeights | None:
    """`in=`/`mid=`/`out=` or `lbw=` of a tag (None without them), checked."""
    regions = {key: named[key] for key in REGION_KEYS if key in named}
    if not regions and "lbw" not in named:
        return None
    if regions and "lbw" in named:
        raise InvalidRequestError(
            f"prompt: {tag} sets block weights twice: {'/'.join(regions)}= and lbw=; "
            "use one of them",
            field="prompt",
        )
    numbers: dict[str, float] = {}
    for key, value in regions.items():
        parsed = parse_weight(value, tag)
        if isinstance(parsed, WeightSchedule):
            raise InvalidRequestError(
                f"prompt: {tag}: {key}= takes a number; schedule the LoRA's weight instead "
                "(unet=0@0,1@1)",
                field="prompt",
            )
        numbers[key] = parsed
    if regions:
        blocks = BlockWeights(numbers.get("in"), numbers.get("mid"), numbers.get("out"))
    else:
        text = named["lbw"].strip()
        values = text.split(",")
        lbw = tuple(_lbw_value(v, tag) for v in values) if len(values) > 1 else text
        blocks = BlockWeights(lbw=lbw)
    try:
        return blocks.check("prompt")
    except InvalidRequestError as error:
        raise InvalidRequestError(
            error.message.replace("prompt:", f"prompt: {tag}:", 1), field="prompt"
        ) from None


def _lbw_value(text: str, tag: str) -> float:
    """One lbw value; the extension's random `R`/`U` and inherited `X` values are refused,
    since an infotext could not replay them."""
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(
            f"prompt: {tag}: lbw= value {text.strip()!r} is not a number (random R/U and "
            "inherited X values are not supported: an infotext could not replay them)",
            field="prompt",
        ) from None


def fold_duplicate_loras(specs: Sequence[LoraSpec]) -> list[LoraSpec]:
    """The stack A1111 actually applies when a name is tagged more than once.

    A1111 keeps one network object per name and sets its multipliers on every tag, so the
    last tag's multipliers win, and the object is applied once per tag: `<lora:a:0.5>
    <lora:a:1>` acts as weight 2. Names are compared exactly; two spellings that resolve
    to the same file are separate networks in A1111 and simply add up.
    """
    counts: dict[str, int] = {}
    last: dict[str, LoraSpec] = {}
    for spec in specs:
        counts[spec.name] = counts.get(spec.name, 0) + 1
        last[spec.name] = spec
    folded = []
    for name, spec in last.items():
        n = counts[name]
        if n == 1:
            folded.append(spec)
            continue
        unet, te = _times(spec.weight, n), _times(spec.text_encoder_weight, n)
        hr_unet = None if spec.hr_weight is None else _times(spec.hr_weight, n)
        hr_te = None if spec.hr_te_weight is None else _times(spec.hr_te_weight, n)
        folded.append(LoraSpec(name, unet, None if te == unet else te, spec.blocks, hr_unet, hr_te))
    return folded


def _times(weight: Weight, n: int) -> Weight:
    return weight.scaled(n) if isinstance(weight, WeightSchedule) else weight * n


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraSpec]]:
    """Remove extra-network tags from `prompt`; return the text and the LoRAs A1111 applies.

    Duplicates are folded as A1111 applies them (see `fold_duplicate_loras`). Non-LoRA tags
    are removed and dropped; use `parse_extra_networks` to report them.

    Example:
        >>> extract_lora_tags("castle <lora:ink:0.5:1>")
        ('castle ', [LoraSpec(name='ink', weight=1.0, te_weight=0.5, ...)])
    """
    parsed = parse_extra_networks(prompt)
    return parsed.text, fold_duplicate_loras(parsed.loras)


def strip_lora_tags(prompt: str, keep: set[str] | frozenset[str] = frozenset()) -> str:
    """`prompt` without its `<lora:...>`/`<lyco:...>` tags and the gaps they leave; tags
    of the names in `keep` (lower case) stay."""

    gap = "\x00"  # where a tag was: only the text around it is tidied

    def drop(match: re.Match[str]) -> str:
        return match.group(0) if match.group(1).lower() in keep else gap

    text = re.sub(r"<(?:lora|lyco):([^:>]*)[^>]*>", drop, prompt)
    text = re.sub(r"[ \t]*(?:\x00[ \t]*)+", gap, text)  # neighbouring tags: one gap
    text = re.sub(r",\x00,", ",", text)  # "a, <tag>, b" -> "a, b"
    text = re.sub(r"\x00(?=,)|^\x00|\x00$", "", text, flags=re.M)  # "a <tag>, b" -> "a, b"
    text = text.replace(gap, " ")
    return text.strip().strip(",").strip()


def combine_stacks(
    ui_stack: tuple[LoraSpec, ...], tag_stack: list[LoraSpec]
) -> tuple[tuple[LoraSpec, ...], list[str]]:
    """The stack a request applies: UI/API rows, then prompt tags. A LoRA named both ways
    takes the tag's weights (the prompt is what gets written into the infotext and
    replayed), and the result says so instead of silently doubling it."""
    tagged = {spec.name.lower() for spec in tag_stack}
    notes = [
        f"LoRA '{spec.name}': the prompt tag's weight replaces the stack weight "
        f"{weight_text(spec.weight)}"
        for spec in ui_stack
        if spec.name.lower() in tagged
    ]
    kept = tuple(spec for spec in ui_stack if spec.name.lower() not in tagged)
    return (*kept, *tag_stack), notes


def format_weight(value: float) -> str:
    """A multiplier written compactly, as A1111's UI writes it: 1, 0.8, -0.25."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def format_lora_tag(spec: LoraSpec) -> str:
    """The `<lora:...>` tag that reads back as `spec` (text encoder weight first), with
    every form it uses: keyframes, `hr=`/`hrte=`/`hrunet=`, `in=`/`mid=`/`out=`, `lbw=`.

    Example:
        >>> format_lora_tag(LoraSpec("ink", 0.8)), format_lora_tag(LoraSpec("ink", 1.0, 0.5))
        ('<lora:ink:0.8>', '<lora:ink:0.5:1>')
    """
    if not spec.name or any(c in spec.name for c in ":>="):
        raise InvalidRequestError(
            f"the LoRA name {spec.name!r} cannot be written as a <lora:...> tag "
            "(it is empty or contains ':', '>' or '=')",
            field="loras",
        )
    te, unet = spec.text_encoder_weight, spec.weight
    items = (
        [spec.name, weight_text(unet)]
        if te == unet
        else [spec.name, weight_text(te), weight_text(unet)]
    )
    if spec.hr_weight is not None and spec.hr_weight == spec.hr_te_weight:
        items.append(f"hr={weight_text(spec.hr_weight)}")
    else:
        if spec.hr_te_weight is not None:
            items.append(f"hrte={weight_text(spec.hr_te_weight)}")
        if spec.hr_weight is not None:
            items.append(f"hrunet={weight_text(spec.hr_weight)}")
    if spec.blocks is not None and spec.blocks.text():
        items.append(spec.blocks.text())
    return f"<lora:{':'.join(items)}>"


# ---------------------------------------------------------------------------------------------
# 3. Tokens: 75-token chunks
# ---------------------------------------------------------------------------------------------

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; each chunk is wrapped in BOS ... EOS to CLIP's 77 positions."""

Emphasis = Literal["Original", "No norm", "Ignore", "None"]
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window: BOS, 75 prompt tokens padded with EOS, EOS; a weight per token.

    EOS padding is A1111's chunk layout; encoders whose pad token differs (OpenCLIP) get
    their pad id after the first EOS at encode time, as A1111's `process_tokens` does.
    """

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()  # (offset after BOS, embedding name)


class EmbeddingLookup:
    """Textual-inversion embeddings by the token ids of their names (A1111's
    `EmbeddingDatabase.ids_lookup`): at each prompt token, the longest name starting there
    wins, and its vectors take the place of those tokens.

    Args:
        vectors: name -> {text-encoder width: [n, width] vectors}.
        ids_of: the tokenizer's ids of a text (without BOS/EOS).
        key: what identifies this set (part of the prompt cache key).
    """

    def __init__(
        self,
        vectors: dict[str, dict[int, torch.Tensor]],
        ids_of: Callable[[list[str]], list[list[int]]],
        key: tuple[object, ...] = (),
    ) -> None:
        self.vectors = vectors
        self.key = key
        names = list(vectors)
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name, ids in zip(names, ids_of(names) if names else [], strict=True):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), name))
        for found in self._by_first.values():
            found.sort(key=lambda item: len(item[0]), reverse=True)

    def match(self, ids: list[int], at: int) -> tuple[int, str] | None:
        """(name's token count, name) of the embedding whose name starts at `ids[at]`."""
        for name_ids, name in self._by_first.get(ids[at], ()):
            if tuple(ids[at : at + len(name_ids)]) == name_ids:
                return len(name_ids), name
        return None

    def count(self, name: str) -> int:
        return int(next(iter(self.vectors[name].values())).shape[0])


class PromptTokenizer:
    """A CLIP tokenizer reading prompt text the way A1111's tokenizers do.

    diffusers' SD2 and SDXL-G tokenizers declare their pad token `!` (id 0) special, so a
    `!` typed in a prompt becomes padding (diffusers issue #4153); A1111's OpenCLIP
    tokenizer reads it as the word `!` (id 256). Prompt text is therefore tokenized without
    special tokens other than BOS/EOS/UNK; tokens added for textual inversion are kept.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos, self.eos = _special_ids(tokenizer)
        self.pad = self.eos if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma: int | None = None if comma in (None, tokenizer.unk_token_id) else comma
        self._backend = _without_extra_special_tokens(tokenizer)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS and without truncation."""
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def chunks(
        self,
        prompt: str,
        *,
        comma_padding_backtrack: int = 20,
        emphasis: Emphasis = "Original",
        field: str = "prompt",
        embeddings: EmbeddingLookup | None = None,
    ) -> tuple[list[PromptChunk], int]:
        """Split a prompt into 75-token chunks as A1111's `tokenize_line` does.

        Fragments are tokenized separately; BREAK closes the current chunk; a chunk that
        fills up moves the text after its last comma to the next chunk when that comma is at
        most `comma_padding_backtrack` tokens back (0 disables it). Returns the chunks and
        A1111's token count (75 per full chunk plus the tokens of the last one), which is
        what its UI counter shows. An empty prompt is one chunk.
        """
        plain = emphasis == "None"
        parsed = [(prompt, 1.0)] if plain else parse_prompt_attention(prompt, field=field)
        tokenized = self.ids([text for text, _ in parsed])
        bos, eos, comma = self.bos, self.eos, self.comma

        chunks: list[PromptChunk] = []
        tokens: list[int] = []
        mults: list[float] = []
        fixes: list[tuple[int, str]] = []
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal tokens, mults, fixes, token_count, last_comma
            token_count += len(tokens) if is_last else CHUNK_LENGTH
            pad = CHUNK_LENGTH - len(tokens)
            chunks.append(
                PromptChunk(
                    tokens=(bos, *tokens, *[eos] * pad, eos),
                    multipliers=(1.0, *mults, *[1.0] * pad, 1.0),
                    fixes=tuple(fixes),
                )
            )
            tokens, mults, fixes, last_comma = [], [], [], -1

        for ids, (text, weight) in zip(tokenized, parsed, strict=True):
            if (text, weight) == BREAK:
                next_chunk()
                continue
            position = 0
            while position < len(ids):
                token = ids[position]
                if token == comma:
                    last_comma = len(tokens)
                elif (
                    comma_padding_backtrack != 0
                    and len(tokens) == CHUNK_LENGTH
                    and last_comma != -1
                    and len(tokens) - last_comma <= comma_padding_backtrack
                ):
                    # the text after the comma moves on, with the embeddings it holds (A1111
                    # leaves their fixes behind, so their vectors land on the padding)
                    cut = last_comma + 1
                    moved_tokens, moved_mults = tokens[cut:], mults[cut:]
                    moved_fixes = [(at - cut, name) for at, name in fixes if at >= cut]
                    tokens, mults = tokens[:cut], mults[:cut]
                    fixes = [(at, name) for at, name in fixes if at < cut]
                    next_chunk()
                    tokens, mults, fixes = moved_tokens, moved_mults, moved_fixes
                if len(tokens) == CHUNK_LENGTH:
                    next_chunk()
                found = embeddings.match(ids, position) if embeddings is not None else None
                if found is None:
                    tokens.append(token)
                    mults.append(weight)
                    position += 1
                    continue
                # an embedding: its vectors go whole into one chunk, in place of its name
                length, name = found
                count = min(embeddings.count(name), CHUNK_LENGTH)  # type: ignore[union-attr]
                if len(tokens) + count > CHUNK_LENGTH:
                    next_chunk()
                fixes.append((len(tokens), name))
                tokens.extend([0] * count)
                mults.extend([weight] * count)
                position += length

        if tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def empty_chunk(self) -> PromptChunk:
        """A1111's `empty_chunk`: BOS then EOS, all weights 1."""
        return PromptChunk(
            tokens=(self.bos, *[self.eos] * (CHUNK_LENGTH + 1)),
            multipliers=(1.0,) * (CHUNK_LENGTH + 2),
        )


def prompt_token_count(
    tokenizer: PromptTokenizer,
    prompt: str,
    steps: int,
    *,
    negative: bool = False,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[int, int]:
    """A1111's `n/75` counter under a prompt box (`update_token_counter`): comments and
    extra-network tags out, each AND part (not for the negative prompt) at each prompt-edit
    step counted, the largest count shown over 75 per chunk.

    Example: `prompt_token_count(tokenizer, "a cat <lora:ink:1>", 20)` -> `(2, 75)`.
    """
    text = strip_comments(prompt)
    try:
        text = parse_extra_networks(text).text
        parts = [text] if negative else [part for part, _ in split_and(text)]
        texts = [
            part for schedule in prompt_schedules(parts, max(steps, 1)) for _, part in schedule
        ]
    except (InvalidRequestError, ValueError):  # A1111 then counts the text as it stands
        texts = [text]

    def count(text: str) -> int:
        try:
            return tokenizer.chunks(text, embeddings=embeddings)[1]
        except InvalidRequestError:  # a weight it cannot read: count the words alone
            return tokenizer.chunks(text, emphasis="None", embeddings=embeddings)[1]

    most = max(count(text) for text in texts)
    return most, math.ceil(max(most, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def tokenize_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    comma_padding_backtrack: int = 20,
    emphasis: Emphasis = "Original",
    field: str = "prompt",
) -> tuple[list[PromptChunk], int]:
    """`PromptTokenizer(tokenizer).chunks(prompt, ...)`; keep a PromptTokenizer to reuse it."""
    return PromptTokenizer(tokenizer).chunks(
        prompt, comma_padding_backtrack=comma_padding_backtrack, emphasis=emphasis, field=field
    )


def _without_extra_special_tokens(tokenizer: Any) -> Any:
    """The fast tokenizer's backend minus special tokens other than BOS/EOS/UNK, or None
    when it has none (then the tokenizer itself is used, exactly as diffusers does)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    keep = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}
    data = json.loads(backend.to_str())
    added = data.get("added_tokens", [])
    kept = [t for t in added if not t.get("special") or t.get("content") in keep]
    if len(kept) == len(added):
        return None
    data["added_tokens"] = kept
    data["padding"] = data["truncation"] = None  # a padded call leaves these set on the backend
    return type(backend).from_str(json.dumps(data))


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UnusableFileError("the tokenizer has no BOS/EOS token; it is not a CLIP tokenizer")
    return int(bos), int(eos)


# ---------------------------------------------------------------------------------------------
# 4. Conditioning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """Text conditioning in the shapes diffusers takes.

    `embeds` is [1, 77*k, D] (k chunks; D = 768 SD1, 1024 SD2, 768+1280 = 2048 SDXL);
    `pooled` is [1, P] for SDXL (encoder 2's projection of the first chunk, 1280 for
    real SDXL) and None otherwise.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    embeddings: tuple[str, ...] = ()  # textual-inversion embeddings the text used

    @property
    def chunks(self) -> int:
        return int(self.embeds.shape[1]) // (CHUNK_LENGTH + 2)


Family = Literal["sd1", "sd2", "sdxl"]
_BATCH_CHUNKS = 8  # chunks per text-encoder call: bounds activation memory for long prompts


_Role = Literal["sd1", "sd2", "sdxl_l", "sdxl_g"]
_SDXL_ROLES: tuple[_Role, ...] = ("sdxl_l", "sdxl_g")


@dataclass(frozen=True)
class _Encoder:
    tokenizer: PromptTokenizer
    model: Any
    role: _Role
    layers: int


class PromptEncoder:
    """A1111's `FrozenCLIPEmbedderWithCustomWords` for a diffusers pipeline's encoders.

    Pass `[pipe.tokenizer]`, `[pipe.text_encoder]` for SD1/SD2 and
    `[pipe.tokenizer, pipe.tokenizer_2]`, `[pipe.text_encoder, pipe.text_encoder_2]` for
    SDXL (`[pipe.tokenizer_2]`, `[pipe.text_encoder_2]` for the refiner).

    Which layer feeds the UNet, as A1111 does it:

    - SD1 (OpenAI CLIP-L: pad token = EOS): A1111 "Clip skip" N (`CLIP_stop_at_last_layers`)
      takes `final_layer_norm(hidden_states[-N])`, or `last_hidden_state` for N = 1. That is
      diffusers' `clip_skip = N - 1`, but do not pass clip_skip to diffusers 0.42.1 with
      transformers 5: its SD1 `encode_prompt` calls the removed `text_encoder.text_model`.
    - SD2 (OpenCLIP-H; its tokenizer pads with `!`, id 0, so pad ≠ EOS): A1111 uses the
      penultimate block + final LayerNorm and ignores Clip skip. diffusers' converted SD2
      text encoder already dropped the last block, so `last_hidden_state` is exactly that.
    - SDXL: CLIP-L gives `hidden_states[-2]` and CLIP-G gives `hidden_states[-2]`, both
      without final LayerNorm (sgm's "penultimate"/layer_idx 11), joined on the feature axis;
      `pooled` is CLIP-G's `text_embeds` of the first chunk. Clip skip is ignored unless
      `sdxl_clip_l_skip` (A1111's "Clip skip SDXL" option, default off), which makes CLIP-L
      use `hidden_states[-N]` (still without LayerNorm); CLIP-G stays penultimate.

    Every encoder tokenizes and chunks the prompt itself and pads with its own pad token
    after the first EOS. Weights follow A1111's `emphasis` option: "Original" (default)
    multiplies each token's vector by its weight, then rescales each chunk so its mean is
    restored; "No norm" skips the rescale; "Ignore" parses but applies no weight; "None"
    reads brackets as text. Weighting runs in float32, as A1111's float32 multipliers make it.
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        *,
        sdxl: bool,
        comma_padding_backtrack: int = 20,
        emphasis: Emphasis = "Original",
        sdxl_clip_l_skip: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("give one tokenizer per text encoder")
        if len(tokenizers) > (2 if sdxl else 1):
            kind = "an SDXL" if sdxl else "an SD1/SD2"
            raise ValueError(f"{len(tokenizers)} text encoders given for {kind} model")
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}")
        if not 0 <= comma_padding_backtrack <= 74:
            raise ValueError("comma_padding_backtrack must be between 0 and 74")
        prompt_tokenizers = [PromptTokenizer(tok) for tok in tokenizers]
        # SD2's OpenCLIP tokenizer pads with a token other than EOS; SD1's pads with EOS.
        first = prompt_tokenizers[0]
        sd_role: Literal["sd1", "sd2"] = "sd1" if first.pad == first.eos else "sd2"
        self.family: Family = "sdxl" if sdxl else sd_role
        self.comma_padding_backtrack = comma_padding_backtrack
        self.emphasis: Emphasis = emphasis
        self.sdxl_clip_l_skip = sdxl_clip_l_skip
        # The SDXL refiner has only CLIP-G; the base model has CLIP-L then CLIP-G.
        roles: list[_Role] = list(_SDXL_ROLES[-len(tokenizers) :]) if sdxl else [sd_role]
        self._encoders = [
            _Encoder(
                tokenizer=tok, model=model, role=role, layers=int(model.config.num_hidden_layers)
            )
            for tok, model, role in zip(prompt_tokenizers, text_encoders, roles, strict=True)
        ]
        if sdxl and not hasattr(self._encoders[-1].model, "text_projection"):
            raise UnusableFileError(
                "the last SDXL text encoder must be a CLIPTextModelWithProjection (CLIP-G): "
                "SDXL needs its pooled projection"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Each text encoder's width (768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-G)."""
        return tuple(int(e.model.config.hidden_size) for e in self._encoders)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text by the first tokenizer (how embedding names match)."""
        return self._encoders[0].tokenizer.ids(texts)

    def tokenize(self, prompt: str, *, field: str = "prompt") -> tuple[list[PromptChunk], int]:
        """Chunks and A1111 token count of `prompt` with the first tokenizer (UI counter)."""
        return self._encoders[0].tokenizer.chunks(
            prompt,
            comma_padding_backtrack=self.comma_padding_backtrack,
            emphasis=self.emphasis,
            field=field,
        )

    def encode(
        self,
        prompt: str,
        *,
        clip_skip: int = 1,
        device: torch.device | str,
        dtype: torch.dtype,
        negative: bool = False,
        embeddings: EmbeddingLookup | None = None,
    ) -> EncodedPrompt:
        """Encode one prompt (tags and comments already removed) as A1111 conditions on it.

        Args:
            prompt: the text; any length (one 77-position chunk per 75 tokens).
            clip_skip: A1111's "Clip skip" (1 = last layer); see the class docstring.
            device: where the token ids and the result go (the pipeline's execution device).
            dtype: dtype of the result (usually the UNet's).
            negative: True for the negative prompt. For SDXL an empty negative prompt gives
                all-zero embeds and pooled, as A1111's `force_zero_negative_prompt` does.
            embeddings: textual-inversion embeddings whose names, written in the text,
                are replaced by their vectors (every encoder takes its own width's).

        Returns:
            EncodedPrompt with embeds [1, 77*k, D] and, for SDXL, pooled [1, P].

        Example:
            >>> enc = PromptEncoder([pipe.tokenizer], [pipe.text_encoder], sdxl=False)
            >>> cond = enc.encode("a (cat:1.2)", clip_skip=2, device="cuda", dtype=torch.float16)
            >>> cond.embeds.shape
            torch.Size([1, 77, 768])
        """
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise InvalidRequestError(
                f"clip_skip must be an integer of at least 1, got {clip_skip!r}", field="clip_skip"
            )
        field = "negative_prompt" if negative else "prompt"
        if self.family == "sdxl" and negative and prompt == "":
            return self._zeros(device, dtype)

        per_encoder = [
            e.tokenizer.chunks(
                prompt,
                comma_padding_backtrack=self.comma_padding_backtrack,
                emphasis=self.emphasis,
                field=field,
                embeddings=embeddings,
            )[0]
            for e in self._encoders
        ]
        used = tuple(dict.fromkeys(name for c in per_encoder[0] for _, name in c.fixes))
        count = max(len(chunks) for chunks in per_encoder)
        features: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        with torch.no_grad():
            for enc, chunks in zip(self._encoders, per_encoder, strict=True):
                # A1111 batches prompts of unequal chunk counts with empty chunks.
                chunks = chunks + [enc.tokenizer.empty_chunk()] * (count - len(chunks))
                parts = []
                for start in range(0, count, _BATCH_CHUNKS):
                    batch = chunks[start : start + _BATCH_CHUNKS]
                    with _vectors_in_place(enc.model, batch, embeddings):
                        z, pool = self._run(enc, batch, clip_skip, device)
                    parts.append(z)
                    if start == 0 and pool is not None:
                        pooled = pool[:1]  # A1111: zs[0].pooled, the first chunk's
                z = torch.cat(parts)  # [k, 77, D]
                features.append(z.reshape(1, -1, z.shape[-1]))  # [k, 77, D] -> [1, 77k, D]
        embeds = torch.cat(features, dim=-1)  # SDXL: [1, 77k, D_L + D_G]
        return EncodedPrompt(
            embeds=embeds.to(device=device, dtype=dtype),
            pooled=None if pooled is None else pooled.to(device=device, dtype=dtype),
            embeddings=used,
        )

    def _run(
        self, enc: _Encoder, chunks: list[PromptChunk], clip_skip: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one encoder on a batch of chunks; return weighted z [n, 77, D] and pooled."""
        ids = torch.tensor([_with_pad(c.tokens, enc) for c in chunks], device=device)
        layer = self._layer(enc, clip_skip)
        out = enc.model(input_ids=ids, output_hidden_states=layer is not None)
        if layer is None:
            z = out.last_hidden_state
        else:
            z = out.hidden_states[layer]
            if enc.role == "sd1":
                z = _final_layer_norm(enc.model)(z)
        pooled = out.text_embeds if enc.role == "sdxl_g" else None
        mults = torch.tensor([c.multipliers for c in chunks], dtype=torch.float32, device=z.device)
        return self._apply_emphasis(z.float(), mults), pooled

    def _layer(self, enc: _Encoder, clip_skip: int) -> int | None:
        """Index into hidden_states, or None for last_hidden_state."""
        if enc.role == "sd2":
            return None
        if enc.role == "sdxl_g" or (enc.role == "sdxl_l" and not self.sdxl_clip_l_skip):
            return -2
        if clip_skip > enc.layers:
            raise InvalidRequestError(
                f"clip_skip must be between 1 and {enc.layers} for this model, got {clip_skip}",
                field="clip_skip",
            )
        if enc.role == "sd1" and clip_skip == 1:
            return None
        return -clip_skip

    def _apply_emphasis(self, z: torch.Tensor, mults: torch.Tensor) -> torch.Tensor:
        """sd_emphasis: weight each token's vector; "Original" restores each chunk's mean."""
        if self.emphasis in ("Ignore", "None"):
            return z
        original_mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * mults[:, :, None]  # [n, 77] -> [n, 77, 1] against [n, 77, D]
        if self.emphasis == "No norm":
            return z
        new_mean = z.mean(dim=(1, 2), keepdim=True)
        # A1111 divides unconditionally; where a chunk's mean is exactly 0 (a LayerNorm with
        # untrained affine weights) that is 0/0 = NaN, so such chunks keep their weighting.
        ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
        return z * ratio

    def _zeros(self, device: torch.device | str, dtype: torch.dtype) -> EncodedPrompt:
        width = sum(int(e.model.config.hidden_size) for e in self._encoders)
        projection = int(self._encoders[-1].model.config.projection_dim)
        return EncodedPrompt(
            embeds=torch.zeros(1, CHUNK_LENGTH + 2, width, device=device, dtype=dtype),
            pooled=torch.zeros(1, projection, device=device, dtype=dtype),
        )


@contextmanager
def _vectors_in_place(
    model: Any, chunks: list[PromptChunk], embeddings: EmbeddingLookup | None
) -> Iterator[None]:
    """While `model` encodes `chunks`, its token embeddings at each chunk's fixes are the
    embedding's vectors of the model's width (A1111's `EmbeddingsWithFixes`). The hook acts
    only in this thread and is gone afterwards: the model keeps no trace of the request."""
    if embeddings is None or not any(chunk.fixes for chunk in chunks):
        yield
        return
    owner = threading.get_ident()

    def put(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None  # another thread encoding with the same model: not this call's
        output = output.clone()
        width = int(output.shape[-1])
        for row, chunk in enumerate(chunks):
            for offset, name in chunk.fixes:
                vectors = embeddings.vectors[name][width].to(output)
                room = output.shape[1] - offset - 1
                output[row, offset + 1 : offset + 1 + min(room, vectors.shape[0])] = vectors[:room]
        return output

    handle = model.get_input_embeddings().register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def _with_pad(tokens: tuple[int, ...], enc: _Encoder) -> list[int]:
    """A1111 process_tokens: everything after the first EOS becomes the pad id."""
    ids, pad, eos = list(tokens), enc.tokenizer.pad, enc.tokenizer.eos
    if pad != eos:
        end = ids.index(eos) + 1
        ids[end:] = [pad] * (len(ids) - end)
    return ids


def _final_layer_norm(model: Any) -> Any:
    """transformers 5 folds the text transformer into CLIPTextModel; 4.x nests it."""
    norm = getattr(model, "final_layer_norm", None)
    return norm if norm is not None else model.text_model.final_layer_norm


def pad_to_same_length(
    a: EncodedPrompt, b: EncodedPrompt, *, empty: EncodedPrompt | None = None
) -> tuple[EncodedPrompt, EncodedPrompt]:
    """Make prompt and negative prompt the same length so diffusers can batch them.

    A1111 by default runs cond and uncond of different lengths through the UNet separately,
    which a diffusers pipeline cannot do. With `empty` (the encoding of "" made right after
    the model loads, before any LoRA, as A1111's `cond_stage_model_empty_prompt`), this is
    A1111's "Pad prompt/negative prompt" option: the shorter one gets copies of the empty
    prompt's chunk. Without it, the shorter one repeats its last vector (A1111's rule for
    AND sub-prompts and its pre-1.6 DDIM padding). Pooled outputs are never padded.
    """
    length_a, length_b = a.embeds.shape[1], b.embeds.shape[1]
    if length_a == length_b:
        return a, b
    if length_a < length_b:
        return _pad(a, length_b, empty), b
    return a, _pad(b, length_a, empty)


def pad_to_longest(
    prompts: list[EncodedPrompt], *, empty: EncodedPrompt | None = None
) -> list[EncodedPrompt]:
    """`pad_to_same_length` for any number of prompts (every text a scheduled or AND
    prompt can switch to is batched with the others)."""
    length = max(prompt.embeds.shape[1] for prompt in prompts)
    return [
        prompt if prompt.embeds.shape[1] == length else _pad(prompt, length, empty)
        for prompt in prompts
    ]


def _pad(prompt: EncodedPrompt, length: int, empty: EncodedPrompt | None) -> EncodedPrompt:
    embeds = prompt.embeds
    missing = length - embeds.shape[1]
    if empty is None:
        fill = embeds[:, -1:].expand(-1, missing, -1)  # [B, 1, D] -> [B, missing, D]
    else:
        repeats = missing // empty.embeds.shape[1]
        fill = empty.embeds.to(embeds).repeat(embeds.shape[0], repeats, 1)
    padded = torch.cat([embeds, fill], dim=1)
    if padded.shape[1] != length:
        raise ValueError("the empty prompt's length does not divide the difference in length")
    return replace(prompt, embeds=padded)
