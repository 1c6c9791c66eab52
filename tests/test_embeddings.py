"""Textual-inversion embeddings: every file format loads offline and is listed in A1111's
shape; an embedding made of a word's own token vectors gives exactly that word's image
(one vector or several, weighted, in the negative prompt, SDXL's two encoders); one for
other text encoders is skipped with the reason and never applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from frontends.api.a1111 import embeddings_listing
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings

SMALL = {"steps": 2, "sampler_name": "Euler", "seed": 3, "width": 64, "height": 64}


def word_vectors(pipe: object, word: str, encoder: str = "text_encoder") -> torch.Tensor:
    """The token embedding rows of `word` in one of the pipeline's text encoders."""
    tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"))
    ids = tokenizer(word, add_special_tokens=False).input_ids
    table = getattr(pipe, encoder).get_input_embeddings().weight
    return table[ids].detach().clone().contiguous()


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Path:
    emb = tmp_path_factory.mktemp("embeddings")
    castle = word_vectors(tiny_sd1.pipe, "castle")
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": castle},
        "name": "mycastle",
        "step": 120,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
    }
    torch.save(a1111, emb / "mycastle.pt")
    save_file({"emb_params": castle}, emb / "stcastle.safetensors")
    torch.save({"<bincastle>": castle[0]}, emb / "bincastle.bin")
    save_file(
        {"emb_params": word_vectors(tiny_sd1.pipe, "red tower")}, emb / "redtower.safetensors"
    )
    xl = {
        "clip_l": word_vectors(tiny_sdxl.pipe, "castle"),
        "clip_g": word_vectors(tiny_sdxl.pipe, "castle", "text_encoder_2"),
    }
    save_file(xl, emb / "xlcastle.safetensors")
    (emb / "broken.pt").write_bytes(b"not a pickle")
    return emb


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, folder: Path) -> Service:
    data = tmp_path_factory.mktemp("embeddings-data")
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), embeddings_dir=folder, threads=2)
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def pixels(service: Service, **fields: object) -> tuple[np.ndarray, str]:
    values = {**SMALL, "checkpoint": "tiny-sd1", **fields}
    result = service.generate(GenerationRequest(**values))  # type: ignore[arg-type]
    return np.asarray(result.images[0]), result.infotexts[0]


@pytest.mark.parametrize("name", ["mycastle", "stcastle", "bincastle"])
def test_a_words_own_vectors_give_that_words_image(service: Service, name: str) -> None:
    word, _ = pixels(service, prompt="a castle on a hill")
    embedded, info = pixels(service, prompt=f"a {name} on a hill")
    assert np.array_equal(embedded, word)
    entry = next(e for e in service.folders.entries("embedding") if e.name == name)
    assert parse_infotext(info).params["TI hashes"] == f"{name}: {entry.sha256[:12]}"
    literal, info = pixels(service, prompt="a castle2x on a hill")
    assert "TI hashes" not in parse_infotext(info).params


def test_several_vectors_weights_and_the_negative_prompt(service: Service) -> None:
    words, _ = pixels(service, prompt="a red tower at dusk")
    embedded, _ = pixels(service, prompt="a redtower at dusk")
    assert np.array_equal(embedded, words)
    weighted, _ = pixels(service, prompt="a (castle:1.3) at dusk")
    assert np.array_equal(pixels(service, prompt="a (mycastle:1.3) at dusk")[0], weighted)
    negative, _ = pixels(service, prompt="a hill", negative_prompt="castle")
    assert np.array_equal(pixels(service, prompt="a hill", negative_prompt="mycastle")[0], negative)
    plain, _ = pixels(service, prompt="a hill")
    assert not np.array_equal(negative, plain)


def test_sdxl_two_encoder_embeddings(service: Service) -> None:
    xl = {"checkpoint": "xl/tiny-sdxl"}
    word, _ = pixels(service, prompt="a castle on a hill", **xl)
    embedded, info = pixels(service, prompt="a xlcastle on a hill", **xl)
    assert np.array_equal(embedded, word)
    assert "xlcastle" in parse_infotext(info).params["TI hashes"]
    # an SD1 embedding on SDXL is skipped, never applied: its name stays a word
    _, info = pixels(service, prompt="a mycastle on a hill", **xl)
    assert "TI hashes" not in parse_infotext(info).params


def test_the_listing_is_a1111s_with_the_reasons(service: Service, folder: Path) -> None:
    pixels(service, prompt="x")  # the SD1 model is loaded: listed by its encoders
    listed = embeddings_listing(service.embeddings())
    assert set(listed["loaded"]) == {"mycastle", "stcastle", "bincastle", "redtower"}
    assert listed["loaded"]["mycastle"] == {
        "step": 120,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
        "shape": 32,
        "vectors": 1,
    }
    assert listed["loaded"]["redtower"]["vectors"] == 2
    assert "this model's text encoders are 32" in listed["skipped"]["xlcastle"]["reason"]
    assert "broken.pt" in listed["skipped"]["broken"]["reason"]
    save_file({"emb_params": torch.zeros(3, 32)}, folder / "later.safetensors")
    try:
        service.rescan()
        assert "later" in embeddings_listing(service.embeddings())["loaded"]
    finally:
        (folder / "later.safetensors").unlink()
        service.rescan()


def test_the_cli_lists_them_and_the_page_inserts_the_word(
    folder: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from frontends.cli.__main__ import main
    from frontends.page.embeddings_panel import insert_word

    common = ["--ckpt-dir", str(models_dir), "--embeddings-dir", str(folder)]
    assert main(["list-embeddings", *common, "--data-dir", str(tmp_path)]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert rows["redtower"][1:3] == ["2", "32"] and rows["xlcastle"][2] == "32+40"
    assert "broken.pt" in rows["broken"][3]
    assert insert_word("a hill", "mycastle") == "a hill, mycastle"
    assert insert_word("", "mycastle") == "mycastle"
