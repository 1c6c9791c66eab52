"""Derive the CLIP BPE files (`vocab.json`, `merges.txt`) of the bundled tokenizer folders.

OpenAI CLIP, OpenCLIP and the Hugging Face CLIP tokenizers all share one byte-level BPE
vocabulary, published as `bpe_simple_vocab_16e6.txt.gz`. The Hub cannot be reached, so the
Hugging Face layout is rebuilt here the way OpenAI's `SimpleTokenizer` builds it:

- merges: lines 1 .. 48894 of the BPE file (the first line is a header; 49152 - 256 - 2 of
  them), written after a `#version: 0.2` header;
- vocab: the 256 byte-level characters, the same characters with `</w>`, one token per merge
  in merge order, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408 entries.

The gzip file ships inside the `open-clip-torch` wheel (read it, never pip-install it).
Run once from the repository root; the results are committed:

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl \\
        open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python pipelines/configs/derive_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

It writes `vocab.json` and `merges.txt` into `clip_l/`, `clip_h/` and `clip_g/` beside this
script (or below `--out`). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

FOLDERS = ("clip_l", "clip_h", "clip_g")
NUM_MERGES = 49152 - 256 - 2  # 48894, as in OpenAI's SimpleTokenizer
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
VOCAB_SIZE = 2 * 256 + NUM_MERGES + len(SPECIAL_TOKENS)  # 49408
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as GPT-2 and CLIP do."""
    # "!".."~", "¡".."¬" and "®".."ÿ" stand for themselves; the other bytes move past 255.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    """Return the 48894 merge pairs of the gzip BPE file, in rank order."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{bpe_gz} is not the CLIP BPE file (expected {NUM_MERGES} merge pairs)")
    return [(first, second) for first, second in merges]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Return the token -> id mapping in OpenAI CLIP order."""
    tokens = list(bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += SPECIAL_TOKENS
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def write_folder(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write `vocab.json` and `merges.txt` into one tokenizer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    merge_lines = [MERGES_HEADER] + [f"{first} {second}" for first, second in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the files into the three folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path of bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder holding clip_l/, clip_h/, clip_g/ (default: beside this script)",
    )
    args = parser.parse_args(argv)
    merges = read_merges(args.bpe_gz)
    vocab = build_vocab(merges)
    for name in FOLDERS:
        write_folder(args.out / name, vocab, merges)
        print(f"wrote {args.out / name}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
