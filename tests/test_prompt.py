"""A1111 prompt syntax and conditioning: parser tables, tag tables, tiny seeded encoders.

Expected weights are written as the products A1111's parser forms (1.1 * 1.1, not 1.21),
because it compares weights exactly when it merges fragments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.prompt import (
    CHUNK_LENGTH,
    EncodedPrompt,
    PromptEncoder,
    PromptTokenizer,
    extract_lora_tags,
    fold_duplicate_loras,
    format_lora_tag,
    format_weight,
    pad_to_same_length,
    parse_extra_networks,
    parse_prompt_attention,
    strip_comments,
    tokenize_prompt,
)
from pipelines.schema import LoraSpec

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
BOS, EOS, COMMA, A, B, CAT = 49406, 49407, 267, 320, 321, 2368
CPU = {"device": "cpu", "dtype": torch.float32}
D = 1 / 1.1

# --------------------------------------------------------------------------------------------
# parse_prompt_attention
# --------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # A1111's own docstring examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # weights, nesting, spaces around the weight (A1111 >= 1.6)
    ("(word:1.2)", [("word", 1.2)]),
    ("(word : 1.2)", [("word ", 1.2)]),
    ("(a:+.5) (b:-1)", [("a", 0.5), (" ", 1.0), ("b", -1.0)]),
    ("((a))", [("a", 1.0 * 1.1 * 1.1)]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("((a)b)", [("a", 1.1 * 1.1), ("b", 1.1)]),
    ("[word]", [("word", D)]),
    ("[[a]]", [("a", D * D)]),
    ("x [(a)] y", [("x a y", 1.0)]),  # 1.1 * (1 / 1.1) is exactly 1.0, so all merge
    ("(a:1.1) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    # unbalanced and stray brackets
    ("[unbalanced", [("unbalanced", D)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("(a:1.2", [("a:1.2", 1.1)]),  # no closing ")": the weight is text
    ("a :1.2)", [("a :1.2)", 1.0)]),
    ("[a:1.2]", [("a:1.2", D)]),  # a weight needs round brackets
    ("(:1.2)", [("", 1.0)]),
    # escapes; a lone backslash is dropped
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    (r"(\(a\))", [("(a)", 1.1)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b break", [("aBREAK b break", 1.0)]),
    ("(BREAK)", [("", 1.1), ("BREAK", -1.1), ("", 1.1)]),  # weighted: no longer a BREAK
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a : +. )"])
def test_unreadable_weight_is_a_request_error(text: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_prompt_attention(text, field="negative_prompt")
    assert err.value.field == "negative_prompt"
    assert text[text.index(":") :] in err.value.message


# --------------------------------------------------------------------------------------------
# comments and extra-network tags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", "a cat"),
        ("a cat # best quality\nsunset", "a cat \nsunset"),
        ("# note\na cat", "\na cat"),
        ("a\n# note\nb", "a\nb"),
        ("a <lora:x:1> # <lora:y:1>", "a <lora:x:1> \n"),
    ],
)
def test_strip_comments(text: str, expected: str) -> None:
    assert strip_comments(text) == expected


LORA_CASES = [
    ("<lora:ink>", [LoraSpec("ink", 1.0)]),
    ("<lora:ink:0.8>", [LoraSpec("ink", 0.8)]),
    ("<lora:ink:0.5:1>", [LoraSpec("ink", 1.0, te_weight=0.5)]),  # text encoder first
    ("<lora:ink:0.7:0.7>", [LoraSpec("ink", 0.7)]),
    ("<lora:ink:unet=0.5>", [LoraSpec("ink", 0.5, te_weight=1.0)]),
    ("<lora:ink:te=0.3>", [LoraSpec("ink", 0.3)]),  # A1111: the UNet defaults to te
    ("<lora:ink:0.8:te=0.3>", [LoraSpec("ink", 0.3)]),
    ("<lora:ink:0.8:unet=0.2:te=0.4>", [LoraSpec("ink", 0.2, te_weight=0.4)]),
    ("<lora:ink:1:0.5:8>", [LoraSpec("ink", 0.5, te_weight=1.0)]),  # dyn dim ignored
    ("<lora:ink:0.6:dyn=16>", [LoraSpec("ink", 0.6)]),
    ("<lora:ink:0.6:foo=1>", [LoraSpec("ink", 0.6)]),  # unknown keys ignored
    ("<lora:ink:-1>", [LoraSpec("ink", -1.0)]),
    ("<lora:ink: 0.5 >", [LoraSpec("ink", 0.5)]),
    ("<lora:my style v2:1e-1>", [LoraSpec("my style v2", 0.1)]),
    ("<lyco:ink:0.4>", [LoraSpec("ink", 0.4)]),
    ("<lora:a:1> <lora:b:0.5>", [LoraSpec("a", 1.0), LoraSpec("b", 0.5)]),
    # one network object per name: last multipliers, applied once per tag
    ("<lora:a:0.5> <lora:a:1>", [LoraSpec("a", 2.0)]),
    ("<lora:a:0.2:1> <lora:b> <lora:a:0.5>", [LoraSpec("a", 1.0), LoraSpec("b", 1.0)]),
    ("<LORA:a:1> <hypernet:h:1>", []),
    ("no tags (at:1.2) <notatag> <lora:>", []),
]


@pytest.mark.parametrize(("prompt", "expected"), LORA_CASES)
def test_extract_lora_tags(prompt: str, expected: list[LoraSpec]) -> None:
    assert extract_lora_tags(prompt)[1] == expected


def test_tags_are_removed_and_the_rest_left_as_is() -> None:
    prompt = "a castle <lora:ink:0.8>, (sunset:1.2) <hypernet:h:1>\n<lyco:z>BREAK x"
    text, loras = extract_lora_tags(prompt)
    assert text == "a castle , (sunset:1.2) \nBREAK x"
    assert loras == [LoraSpec("ink", 0.8), LoraSpec("z", 1.0)]


def test_other_extra_networks_are_reported_as_ignored() -> None:
    parsed = parse_extra_networks("x <hypernet:h:1> <lora:a> <Lora:b:1> <embedding:e>")
    assert parsed.ignored == ("<hypernet:h:1>", "<Lora:b:1>", "<embedding:e>")
    assert parsed.loras == (LoraSpec("a", 1.0),)
    assert parsed.text == "x    "


def test_lora_tags_are_grouped_by_kind_as_a1111_activates_them() -> None:
    parsed = parse_extra_networks("<lyco:a:1> <lora:b:1> <lyco:c:1> <lora:d:1>")
    assert [spec.name for spec in parsed.loras] == ["a", "c", "b", "d"]


@pytest.mark.parametrize(
    "prompt",
    [
        "<lora:ink:abc>",
        "<lora:ink:0.5:x>",
        "<lora:ink:nan>",
        "<lora:ink:inf>",
        "<lora:ink:te=>",
        "<lora:ink:1:1:1.5>",
        "<lora:ink:dyn=x>",
        "<lora::1>",
        "<lora:te=1>",
        "<lora:ink:a=b=c>",
    ],
)
def test_malformed_tag_is_a_request_error_naming_it(prompt: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        extract_lora_tags(f"a cat {prompt} sunset")
    assert err.value.field == "prompt"
    assert prompt in err.value.message


def test_fold_duplicate_loras_keeps_split_weights() -> None:
    specs = [LoraSpec("a", 1.0, te_weight=0.5), LoraSpec("a", 0.25, te_weight=0.75)]
    assert fold_duplicate_loras(specs) == [LoraSpec("a", 0.5, te_weight=1.5)]


@pytest.mark.parametrize(
    ("spec", "tag"),
    [
        (LoraSpec("ink"), "<lora:ink:1>"),
        (LoraSpec("ink", 0.8), "<lora:ink:0.8>"),
        (LoraSpec("ink", 0.8, te_weight=0.8), "<lora:ink:0.8>"),
        (LoraSpec("ink", 1.0, te_weight=0.5), "<lora:ink:0.5:1>"),
        (LoraSpec("ink", -0.25), "<lora:ink:-0.25>"),
        (LoraSpec("ink", 0.1 + 0.2), "<lora:ink:0.30000000000000004>"),
        (LoraSpec("styles/ink v2", 2.0), "<lora:styles/ink v2:2>"),
    ],
)
def test_format_lora_tag_round_trips(spec: LoraSpec, tag: str) -> None:
    assert format_lora_tag(spec) == tag
    text, loras = extract_lora_tags(tag)
    assert text == ""
    assert [(s.name, s.weight, s.text_encoder_weight) for s in loras] == [
        (spec.name, spec.weight, spec.text_encoder_weight)
    ]


@pytest.mark.parametrize("name", ["", "a:b", "a>b", "a=b"])
def test_format_lora_tag_refuses_names_a_tag_cannot_hold(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        format_lora_tag(LoraSpec(name, 1.0))


@pytest.mark.parametrize(
    ("value", "text"), [(1.0, "1"), (0.8, "0.8"), (0.0, "0"), (-2.0, "-2"), (1e-5, "1e-05")]
)
def test_format_weight(value: float, text: str) -> None:
    assert format_weight(value) == text


# --------------------------------------------------------------------------------------------
# tiny seeded components (the bundled CLIP BPE files; no download)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_l() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(
        CONFIGS / "clip_l", pad_token="<|endoftext|>", model_max_length=77
    )


@pytest.fixture(scope="module")
def tok_g() -> CLIPTokenizer:
    """OpenCLIP-style tokenizer: pads with "!" (id 0), as SD2's and SDXL's second one do."""
    return CLIPTokenizer.from_pretrained(CONFIGS / "clip_g", pad_token="!", model_max_length=77)


def _text_config(hidden: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        **extra,
    )


def _with_trained_norms(model: ModelT) -> ModelT:
    """Random LayerNorm affines: fresh ones (1, 0) give zero-mean outputs, which would make
    the mean restoration 0 / 0; trained CLIP's outputs have a clearly non-zero mean."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.3, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def te_l() -> CLIPTextModel:
    torch.manual_seed(0)
    return _with_trained_norms(CLIPTextModel(_text_config(32)))


@pytest.fixture(scope="module")
def te_g() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    return _with_trained_norms(CLIPTextModelWithProjection(_text_config(48, projection_dim=24)))


@pytest.fixture(scope="module")
def sd1(tok_l: CLIPTokenizer, te_l: CLIPTextModel) -> PromptEncoder:
    return PromptEncoder([tok_l], [te_l], sdxl=False)


@pytest.fixture(scope="module")
def sdxl(
    tok_l: CLIPTokenizer,
    tok_g: CLIPTokenizer,
    te_l: CLIPTextModel,
    te_g: CLIPTextModelWithProjection,
) -> PromptEncoder:
    return PromptEncoder([tok_l, tok_g], [te_l, te_g], sdxl=True)


def _ids(tokenizer: CLIPTokenizer, text: str) -> torch.Tensor:
    """Plain diffusers-style tokenization: BOS, text, EOS, the tokenizer's pad, 77 long."""
    return tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids


def _run(model: torch.nn.Module, ids: torch.Tensor | list[int]) -> object:
    ids = torch.as_tensor(ids).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True)


# --------------------------------------------------------------------------------------------
# tokenize_prompt: chunks, BREAK, comma backtracking
# --------------------------------------------------------------------------------------------


def test_short_prompt_is_one_chunk_wrapped_in_bos_eos(tok_l: CLIPTokenizer) -> None:
    chunks, count = tokenize_prompt(tok_l, "a (cat:1.5)")
    assert count == 2
    assert len(chunks) == 1
    assert chunks[0].tokens == (BOS, A, CAT) + (EOS,) * 74
    assert chunks[0].multipliers == (1.0, 1.0, 1.5) + (1.0,) * 74


def test_empty_prompt_is_one_empty_chunk(tok_l: CLIPTokenizer) -> None:
    chunks, count = tokenize_prompt(tok_l, "")
    assert count == 0
    assert [c.tokens for c in chunks] == [(BOS,) + (EOS,) * 76]


def test_exactly_75_tokens_fit_one_chunk_and_76_need_two(tok_l: CLIPTokenizer) -> None:
    one, count = tokenize_prompt(tok_l, "a " * 75)
    assert (len(one), count) == (1, 75)
    assert one[0].tokens == (BOS,) + (A,) * 75 + (EOS,)
    two, count = tokenize_prompt(tok_l, "a " * 76)
    assert (len(two), count) == (2, 76)
    assert two[1].tokens == (BOS, A) + (EOS,) * 75


def test_break_closes_the_chunk(tok_l: CLIPTokenizer) -> None:
    chunks, count = tokenize_prompt(tok_l, "a BREAK b")
    assert [c.tokens[:3] for c in chunks] == [(BOS, A, EOS), (BOS, B, EOS)]
    assert count == 75 + 1
    chunks, _ = tokenize_prompt(tok_l, "BREAK a")  # A1111 emits the empty first chunk
    assert [c.tokens[:2] for c in chunks] == [(BOS, EOS), (BOS, A)]


def test_comma_backtracking_moves_the_tail_to_the_next_chunk(tok_l: CLIPTokenizer) -> None:
    prompt = "a " * 70 + ", " + "b " * 10  # the comma is token 71; the chunk fills at 75
    chunks, count = tokenize_prompt(tok_l, prompt)
    assert chunks[0].tokens == (BOS,) + (A,) * 70 + (COMMA,) + (EOS,) * 5
    assert chunks[1].tokens == (BOS,) + (B,) * 10 + (EOS,) * 66
    assert count == 75 + 10

    chunks, _ = tokenize_prompt(tok_l, prompt, comma_padding_backtrack=0)
    assert chunks[0].tokens == (BOS,) + (A,) * 70 + (COMMA,) + (B,) * 4 + (EOS,)
    assert chunks[1].tokens == (BOS,) + (B,) * 6 + (EOS,) * 70


def test_comma_too_far_back_is_not_used(tok_l: CLIPTokenizer) -> None:
    prompt = "a " * 50 + ", " + "b " * 30  # the comma is 25 tokens back when the chunk fills
    chunks, _ = tokenize_prompt(tok_l, prompt)
    assert chunks[0].tokens == (BOS,) + (A,) * 50 + (COMMA,) + (B,) * 24 + (EOS,)
    chunks, _ = tokenize_prompt(tok_l, prompt, comma_padding_backtrack=25)
    assert chunks[0].tokens == (BOS,) + (A,) * 50 + (COMMA,) + (EOS,) * 25
    assert chunks[1].tokens[:32] == (BOS,) + (B,) * 30 + (EOS,)


def test_emphasis_none_reads_brackets_as_text(tok_l: CLIPTokenizer) -> None:
    plain, _ = tokenize_prompt(tok_l, "(a)", emphasis="None")
    parsed, _ = tokenize_prompt(tok_l, "(a)")
    assert plain[0].tokens[:5] == (BOS, 263, A, 264, EOS)  # "(</w>", "a</w>", ")</w>"
    assert parsed[0].tokens[:3] == (BOS, A, EOS)
    assert set(plain[0].multipliers) == {1.0}
    assert parsed[0].multipliers[1] == 1.1


def test_exclamation_marks_are_words_not_padding(
    tok_l: CLIPTokenizer, tok_g: CLIPTokenizer
) -> None:
    """diffusers' OpenCLIP tokenizers make "!" their special pad token (id 0); A1111's
    OpenCLIP tokenizer reads "!" and "!!" as the words 256 and 748, like CLIP-L does."""
    assert tok_g("wow! great!!", add_special_tokens=False).input_ids == [2781, 0, 830, 0, 0]
    expected = [[2781, 256, 830, 748], [A, 256, B]]
    assert PromptTokenizer(tok_g).ids(["wow! great!!", "a!b"]) == expected
    assert PromptTokenizer(tok_l).ids(["wow! great!!", "a!b"]) == expected
    tok_g("a", padding="max_length", max_length=77)  # leaves padding set on the backend
    assert PromptTokenizer(tok_g).ids(["a"]) == [[A]]


def test_textual_inversion_tokens_are_kept() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / "clip_g", pad_token="!")
    tokenizer.add_tokens(["<my-style>"])
    added = tokenizer.convert_tokens_to_ids("<my-style>")
    assert PromptTokenizer(tokenizer).ids(["a <my-style>!"]) == [[A, added, 256]]


# --------------------------------------------------------------------------------------------
# PromptEncoder: SD1
# --------------------------------------------------------------------------------------------


def test_plain_prompt_equals_the_encoders_last_hidden_state(
    sd1: PromptEncoder, tok_l: CLIPTokenizer, te_l: CLIPTextModel
) -> None:
    prompt = "a photo of a cat, best quality"
    cond = sd1.encode(prompt, **CPU)
    assert sd1.family == "sd1"
    assert cond.pooled is None
    assert cond.embeds.shape == (1, 77, 32)
    assert torch.equal(cond.embeds, _run(te_l, _ids(tok_l, prompt)).last_hidden_state)


def test_weights_scale_only_their_tokens_then_the_mean_is_restored(
    tok_l: CLIPTokenizer, te_l: CLIPTextModel, sd1: PromptEncoder
) -> None:
    plain = sd1.encode("a cat on a mat", **CPU).embeds[0]
    weighted = sd1.encode("a (cat:1.5) on a [mat]", **CPU).embeds[0]
    weights = torch.ones(77)
    weights[2], weights[5] = 1.5, D  # BOS a cat on a mat
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    ratio = (weighted / plain)[:, 0]
    torch.testing.assert_close(ratio[2] / ratio[0], torch.tensor(1.5))
    torch.testing.assert_close(ratio[5] / ratio[0], torch.tensor(D))
    torch.testing.assert_close(ratio[[0, 1, 3, 4, 6, 40]], ratio[0].expand(6))

    no_norm = PromptEncoder([tok_l], [te_l], sdxl=False, emphasis="No norm")
    torch.testing.assert_close(no_norm.encode("a (cat:1.5) on a [mat]", **CPU).embeds[0], scaled)
    ignore = PromptEncoder([tok_l], [te_l], sdxl=False, emphasis="Ignore")
    assert torch.equal(ignore.encode("a (cat:1.5) on a [mat]", **CPU).embeds[0], plain)


def test_150_tokens_make_two_chunks(
    sd1: PromptEncoder, tok_l: CLIPTokenizer, te_l: CLIPTextModel
) -> None:
    cond = sd1.encode("cat " * 150, **CPU)
    assert cond.embeds.shape == (1, 154, 32)
    assert cond.chunks == 2
    chunk = [BOS] + [CAT] * 75 + [EOS]
    each = _run(te_l, chunk).last_hidden_state[0]
    torch.testing.assert_close(cond.embeds[0, :77], each)
    torch.testing.assert_close(cond.embeds[0, 77:], each)
    assert sd1.encode("cat " * 151, **CPU).embeds.shape == (1, 231, 32)
    assert sd1.tokenize("cat " * 151)[1] == 151


def test_break_starts_a_new_chunk(sd1: PromptEncoder) -> None:
    cond = sd1.encode("a cat BREAK a dog", **CPU)
    assert cond.embeds.shape == (1, 154, 32)
    torch.testing.assert_close(cond.embeds[:, :77], sd1.encode("a cat", **CPU).embeds)
    torch.testing.assert_close(cond.embeds[:, 77:], sd1.encode("a dog", **CPU).embeds)


def test_clip_skip_2_is_final_layer_norm_of_the_penultimate_layer(
    sd1: PromptEncoder, tok_l: CLIPTokenizer, te_l: CLIPTextModel
) -> None:
    hidden = _run(te_l, _ids(tok_l, "a cat")).hidden_states
    cond = sd1.encode("a cat", clip_skip=2, **CPU)
    assert torch.equal(cond.embeds, te_l.final_layer_norm(hidden[-2]))
    assert not torch.equal(cond.embeds, sd1.encode("a cat", **CPU).embeds)


@pytest.mark.parametrize("clip_skip", [0, 3, -1, True])
def test_clip_skip_out_of_range_is_a_request_error(sd1: PromptEncoder, clip_skip: int) -> None:
    with pytest.raises(InvalidRequestError) as err:
        sd1.encode("a cat", clip_skip=clip_skip, **CPU)
    assert err.value.field == "clip_skip"


def test_result_takes_the_requested_dtype(sd1: PromptEncoder) -> None:
    cond = sd1.encode("a (cat:1.2)", device="cpu", dtype=torch.float16)
    assert cond.embeds.dtype == torch.float16
    torch.testing.assert_close(
        cond.embeds.float(), sd1.encode("a (cat:1.2)", **CPU).embeds, atol=1e-2, rtol=1e-2
    )


def test_bad_weight_in_the_negative_prompt_names_that_field(sd1: PromptEncoder) -> None:
    with pytest.raises(InvalidRequestError) as err:
        sd1.encode("(ugly:1..2)", negative=True, **CPU)
    assert err.value.field == "negative_prompt"


# --------------------------------------------------------------------------------------------
# PromptEncoder: SD2 (OpenCLIP tokenizer, last layer already dropped by diffusers)
# --------------------------------------------------------------------------------------------


def test_sd2_pads_with_its_pad_token_and_ignores_clip_skip(
    tok_g: CLIPTokenizer, te_l: CLIPTextModel
) -> None:
    sd2 = PromptEncoder([tok_g], [te_l], sdxl=False)
    assert sd2.family == "sd2"
    ids = _ids(tok_g, "a cat")
    assert ids[0, 3:].tolist() == [EOS] + [0] * 73
    cond = sd2.encode("a cat", **CPU)
    assert torch.equal(cond.embeds, _run(te_l, ids).last_hidden_state)
    assert torch.equal(sd2.encode("a cat", clip_skip=2, **CPU).embeds, cond.embeds)


# --------------------------------------------------------------------------------------------
# PromptEncoder: SDXL
# --------------------------------------------------------------------------------------------


def test_sdxl_joins_penultimate_layers_and_pools_encoder_2(
    sdxl: PromptEncoder,
    tok_l: CLIPTokenizer,
    tok_g: CLIPTokenizer,
    te_l: CLIPTextModel,
    te_g: CLIPTextModelWithProjection,
) -> None:
    cond = sdxl.encode("a photo of a cat", **CPU)
    assert cond.embeds.shape == (1, 77, 32 + 48)
    assert cond.pooled is not None and cond.pooled.shape == (1, 24)
    out_l = _run(te_l, _ids(tok_l, "a photo of a cat"))
    out_g = _run(te_g, _ids(tok_g, "a photo of a cat"))
    assert torch.equal(cond.embeds[..., :32], out_l.hidden_states[-2])
    assert torch.equal(cond.embeds[..., 32:], out_g.hidden_states[-2])
    assert torch.equal(cond.pooled, out_g.text_embeds)


def test_sdxl_reads_exclamation_marks_as_a1111_does(
    sdxl: PromptEncoder, te_g: CLIPTextModelWithProjection
) -> None:
    cond = sdxl.encode("a cat!", **CPU)
    out_g = _run(te_g, [BOS, A, CAT, 256, EOS] + [0] * 72)  # pad 0 only after EOS
    assert torch.equal(cond.embeds[..., 32:], out_g.hidden_states[-2])
    assert torch.equal(cond.pooled, out_g.text_embeds)


def test_sdxl_pooled_comes_from_the_first_chunk(
    sdxl: PromptEncoder, te_g: CLIPTextModelWithProjection
) -> None:
    cond = sdxl.encode("cat " * 75 + "BREAK a dog", **CPU)
    assert cond.embeds.shape == (1, 154, 80)
    first = _run(te_g, [BOS] + [CAT] * 75 + [EOS]).text_embeds
    torch.testing.assert_close(cond.pooled, first)


def test_sdxl_ignores_clip_skip_unless_clip_l_skip_is_on(
    sdxl: PromptEncoder,
    tok_l: CLIPTokenizer,
    tok_g: CLIPTokenizer,
    te_l: CLIPTextModel,
    te_g: CLIPTextModelWithProjection,
) -> None:
    default = sdxl.encode("a cat", **CPU).embeds
    assert torch.equal(sdxl.encode("a cat", clip_skip=2, **CPU).embeds, default)

    skip = PromptEncoder([tok_l, tok_g], [te_l, te_g], sdxl=True, sdxl_clip_l_skip=True)
    last = skip.encode("a cat", clip_skip=1, **CPU).embeds
    hidden = _run(te_l, _ids(tok_l, "a cat")).hidden_states
    assert torch.equal(last[..., :32], hidden[-1])  # no final LayerNorm
    assert torch.equal(last[..., 32:], default[..., 32:])  # CLIP-G stays penultimate
    assert torch.equal(skip.encode("a cat", clip_skip=2, **CPU).embeds, default)


def test_sdxl_empty_negative_prompt_is_zeros(sdxl: PromptEncoder, sd1: PromptEncoder) -> None:
    negative = sdxl.encode("", negative=True, **CPU)
    assert torch.equal(negative.embeds, torch.zeros(1, 77, 80))
    assert negative.pooled is not None and torch.equal(negative.pooled, torch.zeros(1, 24))
    assert sdxl.encode("", **CPU).embeds.abs().sum() > 0  # only the negative prompt
    assert sdxl.encode(" ", negative=True, **CPU).embeds.abs().sum() > 0
    assert sd1.encode("", negative=True, **CPU).embeds.abs().sum() > 0  # only SDXL


def test_refiner_has_only_clip_g(tok_g: CLIPTokenizer, te_g: CLIPTextModelWithProjection) -> None:
    refiner = PromptEncoder([tok_g], [te_g], sdxl=True)
    cond = refiner.encode("a cat", **CPU)
    assert cond.embeds.shape == (1, 77, 48)
    assert cond.pooled is not None and cond.pooled.shape == (1, 24)


def test_sdxl_needs_a_projection_on_encoder_2(tok_l: CLIPTokenizer, te_l: CLIPTextModel) -> None:
    with pytest.raises(UnusableFileError):
        PromptEncoder([tok_l, tok_l], [te_l, te_l], sdxl=True)
    with pytest.raises(ValueError):
        PromptEncoder([tok_l, tok_l], [te_l, te_l], sdxl=False)


# --------------------------------------------------------------------------------------------
# pad_to_same_length
# --------------------------------------------------------------------------------------------


def test_pad_with_the_empty_prompt(sdxl: PromptEncoder) -> None:
    empty = sdxl.encode("", **CPU)
    long = sdxl.encode("cat " * 100, **CPU)
    short = sdxl.encode("blurry", negative=True, **CPU)
    padded_long, padded_short = pad_to_same_length(long, short, empty=empty)
    assert padded_long is long
    assert padded_short.embeds.shape == (1, 154, 80)
    assert torch.equal(padded_short.embeds[:, :77], short.embeds)
    assert torch.equal(padded_short.embeds[:, 77:], empty.embeds)
    assert padded_short.pooled is short.pooled
    again_short, again_long = pad_to_same_length(short, long, empty=empty)
    assert torch.equal(again_short.embeds, padded_short.embeds) and again_long is long


def test_pad_without_empty_repeats_the_last_vector(sd1: PromptEncoder) -> None:
    long = sd1.encode("cat " * 160, **CPU)  # 3 chunks
    short = sd1.encode("a dog", **CPU)
    _, padded = pad_to_same_length(long, short)
    assert padded.embeds.shape == (1, 231, 32)
    assert torch.equal(padded.embeds[0, 77:], short.embeds[0, -1].expand(154, -1))


def test_same_length_is_returned_unchanged(sd1: PromptEncoder) -> None:
    a, b = sd1.encode("a", **CPU), sd1.encode("b", **CPU)
    assert pad_to_same_length(a, b) == (a, b)


def test_encoded_prompt_is_frozen(sd1: PromptEncoder) -> None:
    cond = sd1.encode("a", **CPU)
    with pytest.raises(AttributeError):
        cond.embeds = cond.embeds  # type: ignore[misc]
    assert isinstance(cond, EncodedPrompt)


# --------------------------------------------------------------------------------------------
# diffusers: same numbers as encode_prompt for plain prompts, and the pipelines accept ours
# --------------------------------------------------------------------------------------------


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=2,
        attention_head_dim=2,
        **extra,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )


def test_sd1_matches_diffusers_and_plugs_into_the_pipeline(
    sd1: PromptEncoder, tok_l: CLIPTokenizer, te_l: CLIPTextModel
) -> None:
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=te_l,
        tokenizer=tok_l,
        unet=_unet(32),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs, theirs_negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry")
    cond = sd1.encode("a photo of a cat", **CPU)
    uncond = sd1.encode("blurry", negative=True, **CPU)
    assert torch.equal(cond.embeds, theirs)
    assert torch.equal(uncond.embeds, theirs_negative)

    cond = sd1.encode("a (photo:1.3) of a cat " * 20, **CPU)
    cond, uncond = pad_to_same_length(cond, uncond, empty=sd1.encode("", **CPU))
    latents = pipe(
        prompt_embeds=cond.embeds,
        negative_prompt_embeds=uncond.embeds,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()


def test_sdxl_matches_diffusers_and_plugs_into_the_pipeline(
    sdxl: PromptEncoder,
    tok_l: CLIPTokenizer,
    tok_g: CLIPTokenizer,
    te_l: CLIPTextModel,
    te_g: CLIPTextModelWithProjection,
) -> None:
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=te_l,
        text_encoder_2=te_g,
        tokenizer=tok_l,
        tokenizer_2=tok_g,
        unet=_unet(
            80,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 size ids x 8, pooled 24
            use_linear_projection=True,
        ),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a photo of a cat", device="cpu", negative_prompt="blurry"
    )
    cond = sdxl.encode("a photo of a cat", **CPU)
    uncond = sdxl.encode("blurry", negative=True, **CPU)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert torch.equal(uncond.embeds, negative) and torch.equal(uncond.pooled, negative_pooled)

    cond = sdxl.encode("a (photo:1.3) of a cat BREAK sunset", **CPU)
    uncond = sdxl.encode("", negative=True, **CPU)
    cond, uncond = pad_to_same_length(cond, uncond, empty=sdxl.encode("", **CPU))
    latents = pipe(
        prompt_embeds=cond.embeds,
        negative_prompt_embeds=uncond.embeds,
        pooled_prompt_embeds=cond.pooled,
        negative_pooled_prompt_embeds=uncond.pooled,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()


def test_encoding_is_deterministic(sdxl: PromptEncoder) -> None:
    prompt = "masterpiece, (a castle:1.2) on a hill, [fog], " * 8
    first, second = sdxl.encode(prompt, **CPU), sdxl.encode(prompt, **CPU)
    assert first.chunks == second.chunks > 1
    assert torch.equal(first.embeds, second.embeds)
    assert torch.equal(first.pooled, second.pooled)
    assert CHUNK_LENGTH == 75
