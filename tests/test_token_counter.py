"""A1111's prompt token counter (`n/75` under the prompt boxes): extra-network tags and
comments do not count, AND parts and prompt-edit steps are counted apart and the longest
shown, embeddings count as their vectors, and the room grows by 75 per chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from frontends.page.ui import time_taken
from pipelines.loading import CONFIGS_DIR
from pipelines.prompt import PromptTokenizer, prompt_token_count
from pipelines.service import Service, build_service
from pipelines.settings import Settings


@pytest.fixture(scope="module")
def raw() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(CONFIGS_DIR / "clip_l")


def n(raw: CLIPTokenizer, text: str) -> int:
    """Tokens of `text` as the CLIP tokenizer alone counts them (the independent count)."""
    return len(raw(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize(
    ("prompt", "plain"),
    [
        ("a cat <lora:ink:0.8> on a mat", "a cat  on a mat"),
        ("a cat # a comment\non a mat", "a cat \non a mat"),
        ("a (cat:1.3) on a [mat]", "a cat on a mat"),
    ],
)
def test_tags_comments_and_weights_do_not_count(raw: CLIPTokenizer, prompt: str, plain: str):
    tokenizer = PromptTokenizer(raw)
    assert prompt_token_count(tokenizer, prompt, 20) == (n(raw, plain), 75)


def test_and_parts_and_edit_steps_count_apart_the_longest_shown(raw: CLIPTokenizer) -> None:
    tokenizer = PromptTokenizer(raw)
    longest = "a very long dog with a tall red hat"
    assert prompt_token_count(tokenizer, f"a cat AND {longest}", 20)[0] == n(raw, longest)
    assert prompt_token_count(tokenizer, f"a cat AND {longest}", 20, negative=True)[0] == n(
        raw, f"a cat AND {longest}"
    )
    edited = prompt_token_count(tokenizer, "a [cat:dog with a tall red hat:5] sits", 20)[0]
    assert edited == n(raw, "a dog with a tall red hat sits")


def test_the_room_grows_by_a_chunk(raw: CLIPTokenizer) -> None:
    tokenizer = PromptTokenizer(raw)
    words = ", ".join(["tower"] * 40)  # 79 tokens: a second chunk
    used, room = prompt_token_count(tokenizer, words, 20)
    assert n(raw, words) == 79 and room == 150 and used >= 79
    assert prompt_token_count(tokenizer, "", 20) == (0, 75)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    folder = tmp_path_factory.mktemp("counter-embeddings")
    save_file({"emb_params": torch.zeros(5, 32)}, folder / "fivevec.safetensors")
    data = tmp_path_factory.mktemp("counter-data")
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), embeddings_dir=folder)
    return build_service(settings)


def test_the_service_counts_embeddings_as_their_vectors(service: Service) -> None:
    service.select_checkpoint("tiny-sd1")
    assert service.token_count("a fivevec castle", checkpoint="tiny-sd1") == (1 + 5 + 1, 75)
    assert service.token_count("(unclosed:1.2.3", 20)[1] == 75  # never an error


def test_time_taken_reads_as_a1111s() -> None:
    assert time_taken(1.234) == "Time taken: 1.2 sec."
    assert time_taken(63.04) == "Time taken: 1 min. 3.0 sec."
