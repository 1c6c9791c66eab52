"""Textual-inversion embeddings: every file format loads offline and is listed in A1111's
shape (over HTTP too); an embedding made of a word's own token vectors gives exactly that
word's image (one vector or several, weighted, in the negative prompt, in img2img, the
hires pass and a prompts-from-file series, SDXL's two encoders each taking its own
vectors); one for other text encoders is skipped with the reason and never applied; names
match on token ids as A1111's `find_embedding_at_position` does; a request leaves no trace
in the model; TI hashes; the page's cards."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from frontends.api.a1111 import embeddings_listing
from frontends.page.embeddings_panel import card_html, listing_signature, toggle_word
from pipelines.embeddings import EmbeddingStore
from pipelines.folders.hashing import sha256_of_file
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.prompt import EmbeddingLookup, PromptEncoder, PromptTokenizer, _vectors_in_place
from pipelines.prompts_from_file import PromptsScript, line_requests
from pipelines.schema import GenerationRequest, HiresFix, ImageInputs
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
    # the original textual_inversion repository's layout: a ParameterDict of Parameters
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(castle.clone())})
    (emb / "old").mkdir()
    torch.save({"string_to_param": params, "step": 5}, emb / "old" / "pdcastle.pt")
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
    torch.save({"string_to_param": {"*": castle, "+": castle}}, emb / "twoterms.pt")
    lora = {f"lora_te_x.lora_{part}.weight": torch.zeros(4, 4) for part in ("up", "down")}
    save_file({**lora, "lora_te_x.alpha": torch.tensor(4.0)}, emb / "alora.safetensors")
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


def ti_hashes(info: str) -> str | None:
    return parse_infotext(info).params.get("TI hashes")


# -- formats, activation, the maths ----------------------------------------------------------


@pytest.mark.parametrize("name", ["mycastle", "pdcastle", "stcastle", "bincastle"])
def test_a_words_own_vectors_give_that_words_image(service: Service, name: str) -> None:
    word, _ = pixels(service, prompt="a castle on a hill")
    embedded, info = pixels(service, prompt=f"a {name} on a hill")
    assert np.array_equal(embedded, word)
    entry = next(e for e in service.folders.entries("embedding") if e.name == name)
    assert ti_hashes(info) == f"{name}: {entry.sha256[:12]}"
    literal, info = pixels(service, prompt="a castle2x on a hill")
    assert ti_hashes(info) is None


def test_several_vectors_weights_and_the_negative_prompt(service: Service) -> None:
    words, _ = pixels(service, prompt="a red tower at dusk")
    embedded, _ = pixels(service, prompt="a redtower at dusk")
    assert np.array_equal(embedded, words)
    weighted, _ = pixels(service, prompt="a (castle:1.3) at dusk")
    assert np.array_equal(pixels(service, prompt="a (mycastle:1.3) at dusk")[0], weighted)
    assert not np.array_equal(weighted, pixels(service, prompt="a castle at dusk")[0])
    negative, _ = pixels(service, prompt="a hill", negative_prompt="castle")
    embedded, info = pixels(service, prompt="a hill", negative_prompt="mycastle")
    assert np.array_equal(embedded, negative)
    assert ti_hashes(info).startswith("mycastle: ")
    plain, _ = pixels(service, prompt="a hill")
    assert not np.array_equal(negative, plain)
    # the prompt's embeddings are named first, then the negative prompt's, each once
    _, info = pixels(service, prompt="the redtower, mycastle", negative_prompt="stcastle mycastle")
    assert [pair.split(":")[0] for pair in ti_hashes(info).split(", ")] == [
        "redtower",
        "mycastle",
        "stcastle",
    ]


def test_img2img_the_hires_pass_and_a_series_use_them(service: Service) -> None:
    init = ImageInputs(images=(Image.new("RGB", (64, 64), (150, 90, 40)),))
    i2i = {"img2img": init, "denoising_strength": 0.6}
    word, _ = pixels(service, prompt="a castle", **i2i)
    embedded, info = pixels(service, prompt="a mycastle", **i2i)
    assert np.array_equal(embedded, word) and ti_hashes(info).startswith("mycastle")
    hires = {"denoising_strength": 0.5}
    word, _ = pixels(service, prompt="a hill", hires=HiresFix(1.25, prompt="a castle"), **hires)
    embedded, info = pixels(
        service, prompt="a hill", hires=HiresFix(1.25, prompt="a mycastle"), **hires
    )
    assert np.array_equal(embedded, word) and ti_hashes(info).startswith("mycastle")
    base = GenerationRequest(**{**SMALL, "checkpoint": "tiny-sd1"})  # type: ignore[arg-type]
    lines = PromptsScript(text='a castle on a hill\n--prompt "a mycastle on a hill"')
    results = service.series(line_requests(base, lines), label="prompts from file")
    first, second = (np.asarray(result.images[0]) for result in results)
    assert np.array_equal(first, second)


def test_sdxl_two_encoder_embeddings(service: Service) -> None:
    xl = {"checkpoint": "xl/tiny-sdxl"}
    word, _ = pixels(service, prompt="a castle on a hill", **xl)
    embedded, info = pixels(service, prompt="a xlcastle on a hill", **xl)
    assert np.array_equal(embedded, word)
    assert "xlcastle" in ti_hashes(info)
    # an SD1 embedding on SDXL is skipped, never applied: its name stays a word
    _, info = pixels(service, prompt="a mycastle on a hill", **xl)
    assert ti_hashes(info) is None
    # and an SDXL one on SD1 likewise
    literal, info = pixels(service, prompt="a xlcastle on a hill")
    assert ti_hashes(info) is None
    assert not np.array_equal(literal, pixels(service, prompt="a castle on a hill")[0])


def test_each_sdxl_encoder_takes_its_own_vectors(tiny_sdxl: LoadedModel) -> None:
    """CLIP-L gets `clip_l`, CLIP-G gets `clip_g` (and with it the pooled output): a file of
    CLIP-L's "castle" and CLIP-G's "tower" conditions as each encoder reading its word."""
    pipe = tiny_sdxl.pipe
    encoder = PromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], sdxl=True
    )
    assert encoder.widths == (32, 40)
    mixed = {
        32: word_vectors(pipe, "castle"),
        40: word_vectors(pipe, "tower", "text_encoder_2"),
    }
    lookup = EmbeddingLookup({"mixed": mixed}, encoder.token_ids)

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        got = encoder.encode(text, device="cpu", dtype=torch.float32, embeddings=lookup)
        assert got.pooled is not None
        return got.embeds, got.pooled

    embeds, pooled = encode("a mixed house")
    castle, _ = encode("a castle house")
    tower, tower_pooled = encode("a tower house")
    assert torch.equal(embeds[..., :32], castle[..., :32])
    assert torch.equal(embeds[..., 32:], tower[..., 32:])
    assert torch.equal(pooled, tower_pooled)
    assert encoder.encode("a mixed house", device="cpu", dtype=torch.float32).embeddings == ()


def test_a_request_leaves_no_trace_in_the_model(service: Service, tiny_sd1: LoadedModel) -> None:
    before, _ = pixels(service, prompt="a castle on a hill", seed=11)
    pixels(service, prompt="a (mycastle:1.4), redtower", negative_prompt="stcastle", seed=11)
    model = service.runner.manager.current  # type: ignore[attr-defined]
    table = model.pipe.text_encoder.get_input_embeddings()
    assert not table._forward_hooks
    assert torch.equal(table.weight, tiny_sd1.pipe.text_encoder.get_input_embeddings().weight)
    assert model.pipe.tokenizer.added_tokens_encoder.keys() <= {"<|startoftext|>", "<|endoftext|>"}
    assert np.array_equal(pixels(service, prompt="a castle on a hill", seed=11)[0], before)


def test_the_vectors_go_in_only_for_the_thread_that_encodes(tiny_sd1: LoadedModel) -> None:
    model = tiny_sd1.pipe.text_encoder
    tokenizer = PromptTokenizer(tiny_sd1.pipe.tokenizer)
    lookup = EmbeddingLookup({"e": {32: torch.ones(2, 32)}}, tokenizer.ids)
    chunk = tokenizer.chunks("a e", embeddings=lookup)[0][0]
    ids = torch.tensor([chunk.tokens])
    plain = model.get_input_embeddings()(ids)
    seen: list[torch.Tensor] = []
    with _vectors_in_place(model, [chunk], lookup):
        mine = model.get_input_embeddings()(ids)
        other = threading.Thread(target=lambda: seen.append(model.get_input_embeddings()(ids)))
        other.start()
        other.join()
    assert torch.equal(mine[0, 2:4], torch.ones(2, 32)) and torch.equal(mine[0, :2], plain[0, :2])
    assert torch.equal(seen[0], plain)
    assert torch.equal(model.get_input_embeddings()(ids), plain)


def test_names_are_tokenized_once_per_set_and_model(service: Service, folder: Path) -> None:
    """The lookup is made again only when the files or the model change."""
    store = EmbeddingStore(service.folders)
    encoder = service.runner.manager.get("tiny-sd1").encoder  # type: ignore[attr-defined]
    first, _ = store.lookup(encoder)
    assert store.lookup(encoder)[0] is first
    path = folder / "once.safetensors"
    save_file({"emb_params": torch.ones(1, 32)}, path)
    service.rescan()
    try:
        changed, _ = store.lookup(encoder)
        assert changed is not first and "once" in changed.vectors
    finally:
        path.unlink()
        service.rescan()
    assert "once" not in store.lookup(encoder)[0].vectors


# -- A1111's token matching and chunk layout -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_sd1: LoadedModel) -> PromptTokenizer:
    return PromptTokenizer(tiny_sd1.pipe.tokenizer)


def layout(tokenizer: PromptTokenizer, prompt: str, **vectors: int) -> list[tuple]:
    """Each chunk's fixes, and its prompt tokens with each embedding's placeholders as 0."""
    found = {name.replace("_", " "): {32: torch.zeros(n, 32)} for name, n in vectors.items()}
    chunks, _ = tokenizer.chunks(prompt, embeddings=EmbeddingLookup(found, tokenizer.ids))
    return [(c.fixes, c.tokens[1 : c.tokens.index(tokenizer.eos, 1)]) for c in chunks]


def test_names_match_on_token_ids_as_a1111(tokenizer: PromptTokenizer) -> None:
    a, on = (tokenizer.ids([word])[0][0] for word in ("a", "on"))
    assert layout(tokenizer, "a mycastle on", mycastle=3) == [
        (((1, "mycastle"),), (a, 0, 0, 0, on))
    ]
    # case does not matter (CLIP lowercases); inside a longer word it is not the name
    assert layout(tokenizer, "a MyCastle on", mycastle=3)[0][0] == ((1, "mycastle"),)
    assert layout(tokenizer, "a mycastles on", mycastle=3)[0][0] == ()
    # the longest name starting at a token wins; inside brackets the name still counts
    assert layout(tokenizer, "a red tower", red=1, red_tower=2)[0][0] == ((1, "red tower"),)
    assert layout(tokenizer, "a red car", red=1, red_tower=2)[0][0] == ((1, "red"),)
    assert layout(tokenizer, "a (mycastle:1.2)", mycastle=1)[0][0] == ((1, "mycastle"),)


def test_an_embedding_never_straddles_two_chunks(tokenizer: PromptTokenizer) -> None:
    a, b, c, comma = (tokenizer.ids([w])[0][0] for w in ("a", "b", "c", ","))
    # 74 tokens, then 3 vectors: they start the next chunk whole
    chunks = layout(tokenizer, "a " * 74 + "mycastle", mycastle=3)
    assert [len(tokens) for _, tokens in chunks] == [74, 3]
    assert chunks[1][0] == ((0, "mycastle"),)
    # a full chunk whose last comma is near: the text after it moves on, then the vectors
    # (A1111 checks the comma rule before looking for an embedding)
    chunks = layout(tokenizer, "a " * 72 + ", b c mycastle", mycastle=3)
    assert chunks[0][1][-1] == comma and chunks[1] == (((2, "mycastle"),), (b, c, 0, 0, 0))
    # an embedding in the moved text moves with its vectors (A1111 leaves its fix behind)
    chunks = layout(tokenizer, "a " * 70 + ", mycastle b c", mycastle=3)
    assert chunks[0][0] == () and chunks[1] == (((0, "mycastle"),), (0, 0, 0, b, c))
    assert a not in chunks[1][1]


# -- files, listing, API, hashes -------------------------------------------------------------


def test_the_listing_is_a1111s_with_the_reasons(service: Service, folder: Path) -> None:
    pixels(service, prompt="x")  # the SD1 model is loaded: listed by its encoders
    listed = embeddings_listing(service.embeddings())
    assert set(listed["loaded"]) == {"mycastle", "pdcastle", "stcastle", "bincastle", "redtower"}
    assert listed["loaded"]["mycastle"] == {
        "step": 120,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
        "shape": 32,
        "vectors": 1,
    }
    assert listed["loaded"]["pdcastle"]["step"] == 5
    assert listed["loaded"]["redtower"]["vectors"] == 2
    skipped = listed["skipped"]
    assert "this model's text encoders are 32" in skipped["xlcastle"]["reason"]
    assert skipped["xlcastle"]["shape"] == 72 and skipped["xlcastle"]["vectors"] == 1
    assert "broken.pt" in skipped["broken"]["reason"]
    assert "one vector set" in skipped["twoterms"]["reason"]
    assert "holds 3 tensors" in skipped["alora"]["reason"]
    # for another checkpoint (the page's choice): that one's family
    xl = embeddings_listing(service.embeddings("xl/tiny-sdxl"))
    assert set(xl["loaded"]) == set() and "xlcastle" in xl["skipped"]


def test_the_http_routes_list_and_refresh(service: Service, folder: Path) -> None:
    from fastapi.testclient import TestClient

    from frontends.api.routes import build_api

    pixels(service, prompt="x")
    with TestClient(build_api(service, service.settings)) as client:
        listed = client.get("/embeddings").json()
        assert listed["loaded"]["redtower"]["shape"] == 32
        assert set(listed) == {"loaded", "skipped"}
        assert "later" not in listed["loaded"]
        save_file({"emb_params": torch.zeros(3, 32)}, folder / "later.safetensors")
        try:
            refreshed = client.post("/refresh-embeddings")
            assert refreshed.status_code == 200 and refreshed.json() is None
            assert client.get("/embeddings").json()["loaded"]["later"]["vectors"] == 3
        finally:
            (folder / "later.safetensors").unlink()
            service.rescan()


def test_ti_hashes_of_a_file_not_hashed_yet(service: Service, folder: Path) -> None:
    """A file found by a scan is hashed when first used (no waiting for the background
    pass); a name's `,` and `:` are left out of `TI hashes`, as A1111 writes it."""
    path = folder / "new,one.safetensors"
    save_file({"emb_params": torch.full((1, 32), 0.5)}, path)
    try:
        service.folders.scan("embedding")  # listed, not hashed
        entry = next(e for e in service.folders.entries("embedding") if e.name == "new,one")
        assert entry.sha256 is None
        _, info = pixels(service, prompt="a new,one on a hill")
        assert ti_hashes(info) == f"newone: {sha256_of_file(path)[:12]}"
        assert parse_infotext(info).params["Steps"] == "2"  # the rest still parses
    finally:
        path.unlink()
        service.rescan()


def test_a_dropped_replaced_and_deleted_file_is_picked_up(
    service: Service, folder: Path, tiny_sd1: LoadedModel
) -> None:
    """The folder watcher rescans: a new file works without a refresh, a replaced one gives
    its new vectors (never a stale cache), a deleted one is a plain word again."""
    from pipelines.watch import FolderWatcher
    from tests.test_watch import eventually

    path = folder / "hot.safetensors"
    listed = lambda: "hot" in embeddings_listing(service.embeddings())["loaded"]  # noqa: E731
    watcher = FolderWatcher([folder], service.rescan, debounce_ms=100, poll_seconds=2).start()
    try:
        pixels(service, prompt="x")
        save_file({"emb_params": word_vectors(tiny_sd1.pipe, "castle")}, path)
        assert eventually(listed)
        castle, _ = pixels(service, prompt="a castle on a hill")
        assert np.array_equal(pixels(service, prompt="a hot on a hill")[0], castle)
        replacement = folder / "hot.tmp"  # written aside, then moved over it
        save_file({"emb_params": word_vectors(tiny_sd1.pipe, "tower")}, replacement)
        replacement.replace(path)
        tower, _ = pixels(service, prompt="a tower on a hill")
        assert eventually(
            lambda: np.array_equal(pixels(service, prompt="a hot on a hill")[0], tower)
        )
        path.unlink()
        assert eventually(
            lambda: all(e.name != "hot" for e in service.folders.entries("embedding"))
        )
        _, info = pixels(service, prompt="a hot on a hill")
        assert ti_hashes(info) is None
    finally:
        watcher.stop()
        path.unlink(missing_ok=True)
        service.rescan()


def test_the_cli_lists_them(
    folder: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from frontends.cli.__main__ import main

    common = ["--ckpt-dir", str(models_dir), "--embeddings-dir", str(folder)]
    assert main(["list-embeddings", *common, "--data-dir", str(tmp_path)]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert rows["redtower"][1:3] == ["2", "32"] and rows["xlcastle"][2] == "32+40"
    assert "broken.pt" in rows["broken"][3]


# -- the page's cards ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("", "ink"),
        ("a hill", "a hill ink"),
        ("a hill ", "a hill ink"),
        ("a hill ink", "a hill"),  # a second click takes it out again (A1111)
        ("ink, a hill", ", a hill"),
        ("a pink hill", "a pink hill ink"),  # inside another word it is not the name
        ("a hill, (ink:1.2)", "a hill, (:1.2)"),  # A1111's removal leaves the brackets too
    ],
)
def test_a_card_click_toggles_the_name(prompt: str, expected: str) -> None:
    assert toggle_word(prompt, "ink") == expected


def test_the_cards_say_what_each_embedding_is(service: Service) -> None:
    pixels(service, prompt="x")
    listing = service.embeddings()
    entry, embedding = listing.loaded["mycastle"]
    card = card_html("mycastle", entry, embedding, None)
    assert 'class="embedding-name">mycastle<' in card and "1 vector · " in card
    assert "step 120" in card and "no preview" in card and "⚠" not in card
    entry, skipped, reason = listing.skipped["xlcastle"]
    card = card_html("xlcastle", entry, skipped, reason)
    assert "32+40" in card and "⚠ made for 32" in card
    entry, _, reason = listing.skipped["broken"]
    assert "broken.pt" in card_html("<b>", entry, None, reason)
    assert "&lt;b&gt;" in card_html("<b>", entry, None, reason)
    first = listing_signature(listing)
    assert listing_signature(service.embeddings()) == first
    assert listing_signature(service.embeddings("xl/tiny-sdxl")) != first
