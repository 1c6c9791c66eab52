"""Offline model loading: single-file LDM/SGM checkpoints, diffusers folders, random models.

One code path for real and test checkpoints: an LDM yaml (the sidecar beside the file, or
the stock one for the detected family) becomes a config-only diffusers folder (cached);
the weights are converted with diffusers' own converters and loaded strictly, so a file
that does not fit its config is refused with the first mismatched tensors named instead of
leaving random weights behind. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.architecture import Architecture, detect_architecture, probe_v_prediction, shapes_of
from pipelines.errors import UnusableFileError
from pipelines.safeload import is_file_quietly

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"

# Hub names and OpenCLIP arch names found in yamls -> bundled text-encoder folders.
KNOWN_TEXT_ENCODERS = {
    "openai/clip-vit-large-patch14": "clip_l",
    "vit-l-14": "clip_l",
    "vit-h-14": "clip_h",
    "laion/clip-vit-h-14-laion2b-s32b-b79k": "clip_h",
    "vit-bigg-14": "clip_g",
    "laion/clip-vit-bigg-14-laion2b-39b-b160k": "clip_g",
}

# Keys a checkpoint may carry that no model needs (old transformers buffers).
HARMLESS_EXTRA_KEYS = ("embeddings.position_ids",)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a model: where its config/tokenizer live and its LDM layout."""

    component: str  # "text_encoder" or "text_encoder_2"
    folder: Path
    layout: str  # "hf" (CLIP-L, HF names) or "open_clip"
    ldm_prefix: str  # e.g. "cond_stage_model.transformer."
    model_class: str  # "CLIPTextModel" or "CLIPTextModelWithProjection"

    @property
    def tokenizer_folder(self) -> Path:
        """The folder's own tokenizer, else the bundled one of its layout (OpenCLIP
        tokenizers pad with `!`, OpenAI's with `<|endoftext|>`)."""
        if (self.folder / "vocab.json").is_file():
            return self.folder
        return CONFIGS_DIR / ("clip_l" if self.layout == "hf" else "clip_g")


@dataclass(frozen=True)
class ModelSpec:
    """Everything an LDM yaml says about a model, in diffusers terms."""

    architecture: Architecture
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]
    yaml_path: Path
    yaml_digest: str = field(default="")

    @property
    def pipeline_class(self) -> type[DiffusionPipeline]:
        return pipeline_class_for(self.architecture)


def pipeline_class_for(architecture: Architecture) -> type[DiffusionPipeline]:
    """The diffusers pipeline that holds a family's modules (the SDXL refiner's is the
    img2img one; the runs refuse it as the model of a txt2img job)."""
    if architecture is Architecture.SDXL_REFINER:
        return StableDiffusionXLImg2ImgPipeline
    if architecture.family == "SDXL":
        return (
            StableDiffusionXLInpaintPipeline
            if architecture.is_inpainting
            else (StableDiffusionXLPipeline)
        )
    return (
        StableDiffusionInpaintPipeline if architecture.is_inpainting else (StableDiffusionPipeline)
    )


# ---------------------------------------------------------------------------------------
# yaml -> diffusers configs


def _resolve_text_encoder_folder(name: str | None, yaml_dir: Path, default: str) -> Path:
    """A yaml `version:`/`arch:` value -> a folder: relative path first, then known names."""
    if name:
        candidate = (yaml_dir / name).resolve()
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
        known = KNOWN_TEXT_ENCODERS.get(str(name).lower())
        if known:
            return CONFIGS_DIR / known
    return CONFIGS_DIR / default


def _text_encoder_class(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or ["CLIPTextModel"]
    return architectures[0]


def _unet_config(params: Mapping[str, Any], time_embed_dim: int | None) -> dict[str, Any]:
    """An LDM `UNetModel` params block -> a diffusers UNet2DConditionModel config."""
    model_channels = int(params["model_channels"])
    channel_mult = list(params["channel_mult"])
    block_out_channels = [model_channels * mult for mult in channel_mult]
    attention_resolutions = set(params.get("attention_resolutions", []))
    down_types, up_types = [], []
    for level in range(len(block_out_channels)):
        attn = 2**level in attention_resolutions
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
    for level in reversed(range(len(block_out_channels))):
        attn = 2**level in attention_resolutions
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")

    num_heads = params.get("num_heads", -1)
    num_head_channels = params.get("num_head_channels", -1)
    if num_heads is not None and num_heads != -1:
        heads: int | list[int] = int(num_heads)
    elif num_head_channels and num_head_channels != -1:
        heads = [channels // int(num_head_channels) for channels in block_out_channels]
    else:
        raise ValueError("unet params need num_heads or num_head_channels")

    depth = params.get("transformer_depth", 1)
    transformer_layers: int | list[int] = (
        int(depth) if isinstance(depth, int) else [max(int(d), 1) for d in depth]
    )
    context_dim = params.get("context_dim")
    if isinstance(context_dim, list | tuple):
        context_dim = context_dim[0]

    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": block_out_channels,
        "layers_per_block": int(params["num_res_blocks"]),
        "cross_attention_dim": int(context_dim),
        "attention_head_dim": heads,
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": transformer_layers,
    }
    if isinstance(depth, list | tuple) and "transformer_depth_middle" not in params:
        config["transformer_layers_per_block"] = [max(int(d), 1) for d in depth]
    if params.get("num_classes") == "sequential":
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = int(time_embed_dim or 256)
        config["projection_class_embeddings_input_dim"] = int(params["adm_in_channels"])
    return config


def _vae_config(first_stage: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    ddconfig = first_stage["params"]["ddconfig"]
    block_out_channels = [int(ddconfig["ch"]) * mult for mult in ddconfig["ch_mult"]]
    return {
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
        "block_out_channels": block_out_channels,
        "latent_channels": int(ddconfig["z_channels"]),
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "sample_size": int(ddconfig.get("resolution", 256)),
        "scaling_factor": float(scale_factor),
        "force_upcast": True,
    }


def _scheduler_config(
    linear_start: float, linear_end: float, timesteps: int, v_prediction: bool
) -> dict[str, Any]:
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": int(timesteps),
        "beta_start": float(linear_start),
        "beta_end": float(linear_end),
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def read_model_spec(yaml_path: Path) -> ModelSpec:
    """Parse an LDM (SD1/SD2) or SGM (SDXL) inference yaml into diffusers configs.

    Args:
        yaml_path: the yaml; text-encoder `version:` paths are relative to its folder.
    Returns:
        A ModelSpec. Raises UnusableFileError naming the yaml when it cannot be read.
    """
    text = yaml_path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
        params = config["model"]["params"]
        spec = _spec_from_params(params, yaml_path)
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise UnusableFileError(
            f"{yaml_path.name}: not a usable Stable Diffusion config: {error!r}"
        ) from error
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return ModelSpec(
        architecture=spec.architecture,
        unet_config=spec.unet_config,
        vae_config=spec.vae_config,
        scheduler_config=spec.scheduler_config,
        text_encoders=spec.text_encoders,
        yaml_path=yaml_path,
        yaml_digest=digest,
    )


def _spec_from_params(params: Mapping[str, Any], yaml_path: Path) -> ModelSpec:
    yaml_dir = yaml_path.parent
    scale_factor = float(params.get("scale_factor", 0.18215))
    v_prediction = params.get("parameterization", "eps") == "v"
    if "network_config" in params:  # SGM / SDXL
        emb_models = params["conditioner_config"]["params"]["emb_models"]
        encoders: list[TextEncoderSpec] = []
        time_embed_dim = None
        for index, emb in enumerate(emb_models):
            target = emb["target"]
            emb_params = emb.get("params", {}) or {}
            if target.endswith("ConcatTimestepEmbedderND"):
                time_embed_dim = emb_params.get("outdim", time_embed_dim)
                continue
            component = "text_encoder" if not encoders else "text_encoder_2"
            if target.endswith("FrozenCLIPEmbedder"):
                folder = _resolve_text_encoder_folder(emb_params.get("version"), yaml_dir, "clip_l")
                prefix, layout = f"conditioner.embedders.{index}.transformer.", "hf"
            else:
                name = emb_params.get("version") or emb_params.get("arch")
                if emb_params.get("version") and not (yaml_dir / emb_params["version"]).is_dir():
                    name = emb_params.get("arch")
                folder = _resolve_text_encoder_folder(name, yaml_dir, "clip_g")
                prefix, layout = f"conditioner.embedders.{index}.model.", "open_clip"
            encoders.append(
                TextEncoderSpec(component, folder, layout, prefix, _text_encoder_class(folder))
            )
        unet_params = params["network_config"]["params"]
        discretization = (
            params.get("denoiser_config", {}).get("params", {}).get("discretization_config", {})
        )
        disc_params = discretization.get("params", {}) or {}
        scaling = params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {})
        v_prediction = v_prediction or str(scaling.get("target", "")).endswith("VScaling")
        scheduler = _scheduler_config(
            disc_params.get("linear_start", 0.00085),
            disc_params.get("linear_end", 0.012),
            disc_params.get("num_timesteps", 1000),
            v_prediction,
        )
        refiner = len(encoders) == 1 and encoders[0].layout == "open_clip"
        inpaint = int(unet_params["in_channels"]) == 9
        arch = (
            Architecture.SDXL_REFINER
            if refiner
            else Architecture.SDXL_INPAINT
            if inpaint
            else Architecture.SDXL
        )
        if refiner:
            encoders = [
                TextEncoderSpec("text_encoder_2", e.folder, e.layout, e.ldm_prefix, e.model_class)
                for e in encoders
            ]
        unet = _unet_config(unet_params, time_embed_dim)
    else:  # LDM / SD1, SD2
        cond = params["cond_stage_config"]
        cond_params = cond.get("params", {}) or {}
        if "OpenCLIP" in cond["target"]:
            name = cond_params.get("version")
            if not (name and (yaml_dir / name).is_dir()):
                name = cond_params.get("arch", "ViT-H-14")
            folder = _resolve_text_encoder_folder(name, yaml_dir, "clip_h")
            encoder = TextEncoderSpec(
                "text_encoder",
                folder,
                "open_clip",
                "cond_stage_model.model.",
                _text_encoder_class(folder),
            )
        else:
            folder = _resolve_text_encoder_folder(cond_params.get("version"), yaml_dir, "clip_l")
            encoder = TextEncoderSpec(
                "text_encoder",
                folder,
                "hf",
                "cond_stage_model.transformer.",
                _text_encoder_class(folder),
            )
        encoders = [encoder]
        unet_params = params["unet_config"]["params"]
        scheduler = _scheduler_config(
            params.get("linear_start", 0.00085),
            params.get("linear_end", 0.012),
            params.get("timesteps", 1000),
            v_prediction,
        )
        sd2 = encoder.layout == "open_clip"
        inpaint = int(unet_params["in_channels"]) == 9
        if sd2:
            arch = (
                Architecture.SD2_INPAINT
                if inpaint
                else Architecture.SD2_V
                if v_prediction
                else Architecture.SD2
            )
        else:
            arch = Architecture.SD1_INPAINT if inpaint else Architecture.SD1
        unet = _unet_config(unet_params, None)
        if sd2:
            # SD2 attention overflows in fp16 without upcasting (diffusers' SD2.1 config).
            unet["upcast_attention"] = True
    vae = _vae_config(params["first_stage_config"], scale_factor)
    return ModelSpec(arch, unet, vae, scheduler, tuple(encoders), yaml_path)


def with_prediction_type(spec: ModelSpec, v_prediction: bool) -> ModelSpec:
    """The same spec with its prediction type decided (the SD2 base/768-v case)."""
    scheduler = dict(spec.scheduler_config)
    scheduler["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    arch = spec.architecture
    if arch in (Architecture.SD2, Architecture.SD2_V):
        arch = Architecture.SD2_V if v_prediction else Architecture.SD2
    return ModelSpec(
        arch,
        spec.unet_config,
        spec.vae_config,
        scheduler,
        spec.text_encoders,
        spec.yaml_path,
        spec.yaml_digest,
    )


def write_config_folder(spec: ModelSpec, cache_root: Path) -> Path:
    """A config-only diffusers folder for `spec`, cached by content under `cache_root`.

    Holds model_index.json (safety_checker/feature_extractor as [null, null]) and each
    component's config plus the tokenizers, exactly what diffusers' loaders read.
    """
    cls = spec.pipeline_class
    index: dict[str, Any] = {"_class_name": cls.__name__, "_diffusers_version": "0.42.1"}
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for component in ("text_encoder", "text_encoder_2"):
        encoder = next((e for e in spec.text_encoders if e.component == component), None)
        if encoder is not None:
            index[component] = ["transformers", encoder.model_class]
            index[tokenizer_names[component]] = ["transformers", "CLIPTokenizer"]
        elif spec.architecture.family == "SDXL" or component == "text_encoder":
            index[component] = [None, None]
            index[tokenizer_names[component]] = [None, None]
    if spec.architecture is Architecture.SDXL_REFINER:
        index["requires_aesthetics_score"] = True
    if spec.architecture.family == "SDXL":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False

    payload = json.dumps(
        [
            index,
            spec.unet_config,
            spec.vae_config,
            spec.scheduler_config,
            [(e.component, str(e.folder)) for e in spec.text_encoders],
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:20]
    target = cache_root / "model-configs" / digest
    if (target / "model_index.json").is_file():
        return target

    cache_root.joinpath("model-configs").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root / "model-configs", prefix=".tmp-"))
    try:
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        for name, config in (
            ("unet", dict(spec.unet_config, _class_name="UNet2DConditionModel")),
            ("vae", dict(spec.vae_config, _class_name="AutoencoderKL")),
        ):
            (staging / name).mkdir()
            (staging / name / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(spec.scheduler_config, indent=2)
        )
        for encoder in spec.text_encoders:
            (staging / encoder.component).mkdir()
            shutil.copy2(encoder.folder / "config.json", staging / encoder.component)
            shutil.copytree(
                encoder.tokenizer_folder,
                staging / tokenizer_names[encoder.component],
                ignore=shutil.ignore_patterns("config.json", "*.py", "*.md"),
            )
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its folder is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------
# weights -> modules


def _check_and_load(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, source: str
) -> None:
    """Load `weights` strictly; refuse with the first mismatches named, both shapes given."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    weights = {k: v for k, v in weights.items() if not k.endswith(HARMLESS_EXTRA_KEYS)}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs config {expected[k]}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != expected[k]
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensors (first: {', '.join(unexpected[:3])})"
        )
    if problems:
        raise UnusableFileError(
            f"{source}: the {what} weights do not fit the model config: "
            + "; ".join(problems)
            + ". If this is a non-standard model, put a matching .yaml beside it."
        )
    module.load_state_dict(weights, strict=True, assign=True)


def _empty_module(factory: Any) -> torch.nn.Module:
    """Parameters on the meta device (no memory, no init cost); buffers stay real, since
    non-persistent ones (CLIP's position_ids) are never in a checkpoint."""
    with init_empty_weights(include_buffers=False):
        return factory()


def _build_text_encoder(encoder: TextEncoderSpec) -> torch.nn.Module:
    config = CLIPTextConfig.from_pretrained(encoder.folder, local_files_only=True)
    cls = (
        CLIPTextModelWithProjection
        if encoder.model_class.endswith("Projection")
        else (CLIPTextModel)
    )
    return cls(config)


def _convert_text_encoder(
    model: torch.nn.Module, encoder: TextEncoderSpec, checkpoint: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Convert with an explicit prefix: diffusers' own dispatch guesses from widths and
    mis-loads SDXL checkpoints whose two text encoders have equal widths."""
    if encoder.layout == "hf":
        scoped = {k: v for k, v in checkpoint.items() if k.startswith(encoder.ldm_prefix)}
        converted = convert_ldm_clip_checkpoint(scoped, encoder.ldm_prefix)
    else:
        scoped = {k: v for k, v in checkpoint.items() if k.startswith(encoder.ldm_prefix)}
        converted = convert_open_clip_checkpoint(model, scoped, prefix=encoder.ldm_prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    if not converted:
        raise UnusableFileError(f"no {encoder.component} weights under '{encoder.ldm_prefix}'")
    return converted


def modules_from_checkpoint(
    spec: ModelSpec, checkpoint: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoders built from `spec` and filled strictly from `checkpoint`."""
    checkpoint = dict(checkpoint)
    modules: dict[str, torch.nn.Module] = {}
    for name, what, cls, config, convert in (
        ("unet", "UNet", UNet2DConditionModel, spec.unet_config, convert_ldm_unet_checkpoint),
        ("vae", "VAE", AutoencoderKL, spec.vae_config, convert_ldm_vae_checkpoint),
    ):
        module = _empty_module(lambda cls=cls, config=config: cls(**config))
        try:
            weights = convert(checkpoint, dict(config))
        except (KeyError, IndexError, ValueError, RuntimeError) as error:
            raise UnusableFileError(
                f"{source}: the {what} weights do not fit the model config ({error!r})"
            ) from error
        _check_and_load(module, weights, what, source)
        modules[name] = module

    for encoder in spec.text_encoders:
        model = _empty_module(lambda e=encoder: _build_text_encoder(e))
        try:
            weights = _convert_text_encoder(model, encoder, checkpoint)
        except UnusableFileError as error:
            raise UnusableFileError(f"{source}: {error.message}") from error
        _check_and_load(model, weights, encoder.component, source)
        modules[encoder.component] = model
    return modules


def random_modules(spec: ModelSpec, seed: int) -> dict[str, torch.nn.Module]:
    """Deterministically initialised random modules for `spec` (demo model, tests)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        modules: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel(**spec.unet_config),
            "vae": AutoencoderKL(**spec.vae_config),
        }
        for encoder in spec.text_encoders:
            modules[encoder.component] = _build_text_encoder(encoder)
    finally:
        torch.random.set_rng_state(generator_state)
    return modules


def assemble_pipeline(
    spec: ModelSpec, modules: dict[str, torch.nn.Module], config_folder: Path
) -> DiffusionPipeline:
    """Put modules, tokenizers and the scheduler together into spec's pipeline class."""
    components: dict[str, Any] = {name: module.eval() for name, module in modules.items()}
    components["scheduler"] = EulerDiscreteScheduler.from_config(spec.scheduler_config)
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for encoder in spec.text_encoders:
        components[tokenizer_names[encoder.component]] = CLIPTokenizer.from_pretrained(
            config_folder / tokenizer_names[encoder.component], local_files_only=True
        )
    cls = spec.pipeline_class
    if spec.architecture.family == "SDXL":
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            components.setdefault(name, None)
        if spec.architecture is Architecture.SDXL_REFINER:
            components["requires_aesthetics_score"] = True
        pipe = cls(**components, add_watermarker=False)
    else:
        pipe = cls(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    for module in modules.values():
        module.requires_grad_(False)
    return pipe


# ---------------------------------------------------------------------------------------
# entry points


@dataclass
class LoadedModel:
    """A ready pipeline and what we learnt while loading it."""

    pipe: DiffusionPipeline
    architecture: Architecture
    source: str
    notes: list[str] = field(default_factory=list)


def spec_for_checkpoint(
    path: Path, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[ModelSpec, bool, str]:
    """The spec for a single-file checkpoint: sidecar yaml (A1111's `foo.yaml` beside
    `foo.safetensors`) when present, else the stock yaml of the detected family.
    Returns (spec, prediction type still to be probed, how the config was chosen)."""
    try:
        detection = detect_architecture(shapes, source=path.name)
    except ValueError as error:
        raise UnusableFileError(str(error)) from error
    sidecar = path.with_suffix(".yaml")
    if is_file_quietly(sidecar):
        spec = read_model_spec(sidecar)
        if spec.architecture.family != detection.architecture.family:
            raise UnusableFileError(
                f"{path.name}: its sidecar {sidecar.name} describes an "
                f"{spec.architecture.value} model but the weights are "
                f"{detection.architecture.value}"
            )
        return spec, False, f"sidecar {sidecar.name}"
    spec = read_model_spec(CONFIGS_DIR / detection.architecture.stock_yaml)
    return spec, detection.v_ambiguous, f"stock {detection.architecture.stock_yaml}"


def load_single_file(
    path: Path, checkpoint: Mapping[str, torch.Tensor], cache_root: Path
) -> LoadedModel:
    """Build a pipeline from an already safely-read single-file checkpoint.

    Args:
        path: the file (for its name and sidecar yaml).
        checkpoint: its state dict (read with pipelines.safeload).
        cache_root: where config-only diffusers folders are cached.
    Returns:
        LoadedModel on the CPU in the checkpoint's dtype.
    """
    spec, probe, chosen = spec_for_checkpoint(path, shapes_of(checkpoint))
    notes = [f"config: {chosen}"]
    folder = write_config_folder(spec, cache_root)
    modules = modules_from_checkpoint(spec, checkpoint, path.name)
    if probe:
        is_v, mean = probe_v_prediction(modules["unet"])
        spec = with_prediction_type(spec, is_v)
        notes.append(
            f"SD2 prediction type decided by a test forward pass (mean {mean:.3f}): "
            + ("v-prediction (768-v)" if is_v else "epsilon (512-base)")
        )
        folder = write_config_folder(spec, cache_root)
    pipe = assemble_pipeline(spec, modules, folder)
    for note in notes:
        log.info("%s: %s", path.name, note)
    return LoadedModel(pipe, spec.architecture, path.name, notes)


def architecture_of_diffusers_folder(folder: Path) -> Architecture:
    """Family of a diffusers folder, from its unet/scheduler configs."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UnusableFileError(f"{folder.name}: unreadable diffusers folder: {error}") from error
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    inpaint = unet.get("in_channels") == 9
    if "XL" in index.get("_class_name", "") or unet.get("addition_embed_type") == "text_time":
        if index.get("text_encoder") in (None, [None, None]):
            return Architecture.SDXL_REFINER
        return Architecture.SDXL_INPAINT if inpaint else Architecture.SDXL
    if unet.get("cross_attention_dim") == 1024:
        if inpaint:
            return Architecture.SD2_INPAINT
        v = scheduler.get("prediction_type") == "v_prediction"
        return Architecture.SD2_V if v else Architecture.SD2
    return Architecture.SD1_INPAINT if inpaint else Architecture.SD1


def load_diffusers_folder(folder: Path) -> LoadedModel:
    """Load a diffusers-format folder offline with the txt2img pipeline of its family."""
    arch = architecture_of_diffusers_folder(folder)
    cls = pipeline_class_for(arch)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if arch.family == "SDXL":
        kwargs["add_watermarker"] = False
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UnusableFileError(f"{folder.name}: cannot load diffusers folder: {error}") from error
    return LoadedModel(pipe, arch, folder.name, [f"diffusers folder ({arch.value})"])


def random_pipeline(yaml_path: Path, seed: int, cache_root: Path) -> LoadedModel:
    """A pipeline with seeded random weights shaped by `yaml_path` (the demo model)."""
    spec = read_model_spec(yaml_path)
    folder = write_config_folder(spec, cache_root)
    pipe = assemble_pipeline(spec, random_modules(spec, seed), folder)
    return LoadedModel(pipe, spec.architecture, yaml_path.stem, ["random weights"])
