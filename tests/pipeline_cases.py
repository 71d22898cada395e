"""The pipeline matrix of tests/test_pipelines.py: tiny diffusers pipelines built locally, and how to swap their UNet.

Every case builds a fresh pipeline from tiny random components (fixed seeds, no hub, no text encoder or
tokenizer: prompt / image embeddings are passed directly) around diffusers' own `UNet2DConditionModel`, and
the keyword arguments of one call (2 UNet steps, seeded generator, a raw output: latents, or IF's pixel-space
tensor). Helpers:

- `run(pipe, case)`: the pipeline's raw output as a float64 numpy array;
- `recording_calls(model)`: records every call a pipeline makes to `model` (inputs and output sample);
- `record_first_call(pipe, case)`: runs the pipeline; returns its output and the first call it made to `pipe.unet`;
- `ours_eager(unet)`: our eager `compiled_unet.UNet2DConditionModel` with diffusers' config and weights;
- `compile_for(unet, call)`: `compiled_unet.compile` on exactly that call's inputs, cached per UNet structure,
  weights and input shapes, so each distinct one is compiled once per test process;
- `record_unet_reads(case)`: the attributes and methods a pipeline reads from `pipe.unet` (exploratory:
  `python tests/pipeline_cases.py` prints them per case; not a test requirement).

UNets and ControlNets get all their parameters randomised (`cases.randomize_`): diffusers zero-initialises
some layers (ControlNet's zero convolutions would make every residual 0), which would hide whole inputs.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from cases import randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE = 16            # pixels; every VAE / MoVQ here has 2 blocks (scale factor 2), so latents are 8x8
SEQ = 7               # text tokens in the prompt embeddings
STEPS = 2             # UNet evaluations per pipeline call (img2img: 4 scheduler steps at strength 0.5)
SCHEDULER_STEPS = 3   # the scheduler test: Euler's 3-step Karras schedule has a fractional timestep

# Tiny UNets (one ResNet per block: fewer graph nodes, shorter compiles). `sample_size` = latent size.
_BASE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
             sample_size=IMAGE // 2)
SD_UNET = dict(_BASE, in_channels=4, out_channels=4, cross_attention_dim=16,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD_DIM = 16
SDXL_TIME_DIM, SDXL_POOLED = 4, 8
SDXL_UNET = dict(_BASE, in_channels=4, out_channels=4, cross_attention_dim=32, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED)
SDXL_DIM = 32
LCM_UNET = dict(SD_UNET, time_cond_proj_dim=32)
INPAINT_UNET = dict(SD_UNET, in_channels=9)
# Kandinsky 2.2 decoder: text states come from the image embedding (`image_proj`); out_channels = 2 x in (variance).
KANDINSKY_DIM = 16
KANDINSKY_UNET = dict(_BASE, in_channels=4, out_channels=8, cross_attention_dim=16, encoder_hid_dim=KANDINSKY_DIM,
                      encoder_hid_dim_type="image_proj", addition_embed_type="image",
                      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                      mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift")
# DeepFloyd IF stage I: pixel space (3 -> 6 channels), text projection + "text" addition embedding. The
# cross-attention group norm has 32 groups (diffusers' fixed default), so the text width is 32.
IF_DIM = 32
IF_UNET = dict(_BASE, sample_size=8, in_channels=3, out_channels=6, cross_attention_dim=IF_DIM, encoder_hid_dim=IF_DIM,
               down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
               up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="text", addition_embed_type_num_heads=2,
               cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu")

CONTROLNET_SD = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                     in_channels=4, cross_attention_dim=16, conditioning_embedding_out_channels=(8, 16),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
CONTROLNET_SDXL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                       in_channels=4, cross_attention_dim=32, conditioning_embedding_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
                       projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED)


def _quiet():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ components

def unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**cfg), seed).eval()


def controlnet(cfg: dict, seed: int = 1):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return randomize_(ControlNetModel(**cfg), seed).eval()


def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=IMAGE).eval()


def movq():
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(block_out_channels=(32, 64),  # SpatialNorm has 32 fixed groups
                   down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
                   latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, vq_embed_dim=4).eval()


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def euler_karras():
    """Euler with Karras sigmas: its timesteps come from sigmas, float32 and fractional from 3 steps on
    (3 steps: 999, 427.49, 0)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  use_karras_sigmas=True, steps_offset=1)


def dpm_solver():
    """DPM-Solver++ (2nd order, Karras sigmas). diffusers 0.42 casts its timesteps to int64 whatever the sigmas
    (3 steps: 999, 427, 0), so it checks another step rule and timestep sequence, not fractions."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       use_karras_sigmas=True, steps_offset=1)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sd_text(dim: int = SD_DIM) -> dict:
    return dict(prompt_embeds=_randn(1, SEQ, dim, seed=11), negative_prompt_embeds=_randn(1, SEQ, dim, seed=12))


def _sdxl_text() -> dict:
    return dict(**_sd_text(SDXL_DIM), pooled_prompt_embeds=_randn(1, SDXL_POOLED, seed=13),
                negative_pooled_prompt_embeds=_randn(1, SDXL_POOLED, seed=14))


def _image(seed: int = 21) -> torch.Tensor:
    return _rand(1, 3, IMAGE, IMAGE, seed=seed)  # in [0, 1]; the image processors normalise to [-1, 1]


# ------------------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any]          # a fresh pipeline around a fresh diffusers UNet (fixed seeds)
    inputs: Callable[[], dict]        # keyword arguments of the pipeline call (fresh generator each time)
    unet_config: dict = field(default_factory=dict)
    notes: str = ""


def _sd(cls_name: str, unet_cfg: dict, scheduler=ddim, **extra):
    def build():
        import diffusers

        _quiet()
        return getattr(diffusers, cls_name)(vae=vae(), text_encoder=None, tokenizer=None, unet=unet(unet_cfg),
                                            scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False, **{k: f() for k, f in extra.items()})
    return build


def _sdxl(cls_name: str, **extra):
    def build():
        import diffusers

        _quiet()
        return getattr(diffusers, cls_name)(vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, unet=unet(SDXL_UNET), scheduler=euler_karras(),
                                            add_watermarker=False, **{k: f() for k, f in extra.items()})
    return build


def _kandinsky():
    from diffusers import KandinskyV22Pipeline

    _quiet()
    return KandinskyV22Pipeline(unet=unet(KANDINSKY_UNET), scheduler=ddim(), movq=movq())


def _deepfloyd_if():
    from diffusers import DDPMScheduler, IFPipeline

    _quiet()
    # IF's scheduler as diffusers' tests configure it, but without thresholding / clipping: with them, a tiny
    # random UNet's output saturates at +-1 and would hide differences. The learned variance (the UNet's
    # second 3 channels) stays in use.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=False, clip_sample=False, prediction_type="epsilon",
                              variance_type="learned_range")
    return IFPipeline(tokenizer=None, text_encoder=None, unet=unet(IF_UNET), scheduler=scheduler, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)


def _lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _common(**kw) -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(), output_type="latent", **kw)


_SIZE = dict(height=IMAGE, width=IMAGE)
_IMG2IMG = dict(num_inference_steps=2 * STEPS, strength=0.5)  # 2 UNet steps

CASES: dict[str, Case] = {c.name: c for c in [
    Case("sd_txt2img", _sd("StableDiffusionPipeline", SD_UNET), lambda: _common(**_sd_text(), **_SIZE), SD_UNET),
    Case("sd_img2img", _sd("StableDiffusionImg2ImgPipeline", SD_UNET),
         lambda: {**_common(**_sd_text(), image=_image()), **_IMG2IMG}, SD_UNET),
    Case("sd_inpaint", _sd("StableDiffusionInpaintPipeline", INPAINT_UNET),
         lambda: _common(**_sd_text(), image=_image(), mask_image=(_rand(1, 1, IMAGE, IMAGE, seed=22) > 0.5).float(),
                         **_SIZE), INPAINT_UNET, "9-channel UNet: latents + mask + masked-image latents"),
    Case("sdxl_txt2img", _sdxl("StableDiffusionXLPipeline"), lambda: _common(**_sdxl_text(), **_SIZE), SDXL_UNET),
    Case("sdxl_img2img", _sdxl("StableDiffusionXLImg2ImgPipeline"),
         lambda: {**_common(**_sdxl_text(), image=_image()), **_IMG2IMG}, SDXL_UNET),
    Case("controlnet_sd", _sd("StableDiffusionControlNetPipeline", SD_UNET, controlnet=lambda: controlnet(CONTROLNET_SD)),
         lambda: _common(**_sd_text(), image=_image(23), **_SIZE), SD_UNET, "residuals from a random ControlNet"),
    Case("controlnet_sdxl", _sdxl("StableDiffusionXLControlNetPipeline", controlnet=lambda: controlnet(CONTROLNET_SDXL)),
         lambda: _common(**_sdxl_text(), image=_image(23), **_SIZE), SDXL_UNET, "residuals from a random ControlNet"),
    Case("lcm", _sd("LatentConsistencyModelPipeline", LCM_UNET, scheduler=_lcm_scheduler),
         lambda: dict(prompt_embeds=_sd_text()["prompt_embeds"], num_inference_steps=STEPS, guidance_scale=6.0,
                      generator=_gen(), output_type="latent", **_SIZE), LCM_UNET,
         "time_cond_proj_dim: guidance embedding as timestep_cond, no classifier-free batch"),
    Case("kandinsky22", _kandinsky,
         lambda: dict(image_embeds=_randn(1, KANDINSKY_DIM, seed=31), negative_image_embeds=_randn(1, KANDINSKY_DIM, seed=32),
                      num_inference_steps=STEPS, guidance_scale=4.0, generator=_gen(), output_type="latent", **_SIZE),
         KANDINSKY_UNET, "calls the UNet with encoder_hidden_states=None, added_cond_kwargs={'image_embeds'}"),
    Case("deepfloyd_if", _deepfloyd_if,
         lambda: dict(prompt_embeds=_randn(1, SEQ, IF_DIM, seed=41), negative_prompt_embeds=_randn(1, SEQ, IF_DIM, seed=42),
                      num_inference_steps=STEPS, guidance_scale=7.0, generator=_gen(), output_type="pt",
                      height=8, width=8), IF_UNET, "pixel space; output_type='pt' is the raw (unclamped) sample"),
]}


def scheduler_case(name: str, scheduler: Callable[[], Any]) -> Case:
    """SD txt2img (same UNet, same call shapes as `sd_txt2img`) with another scheduler, 3 steps (2 steps of
    a Karras schedule are t = 999 and 0: no fraction)."""
    return Case(f"sd_txt2img_{name}", _sd("StableDiffusionPipeline", SD_UNET, scheduler=scheduler),
                lambda: {**CASES["sd_txt2img"].inputs(), "num_inference_steps": SCHEDULER_STEPS}, SD_UNET)


SCHEDULERS = {"euler_karras": euler_karras, "dpm_solver": dpm_solver}


# ------------------------------------------------------------------------------------------ running

def run(pipe, case: Case) -> np.ndarray:
    """The pipeline's raw output (latents, or IF's pixel-space sample) as float64 numpy."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(**case.inputs())
    images = out.images if hasattr(out, "images") else out[0]
    return torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).double().numpy()


@dataclass
class Call:
    """One call to `unet.forward`, bound to diffusers' parameter names (None-valued ones but
    encoder_hidden_states, and return_dict, dropped)."""
    sample: torch.Tensor
    timestep: Any
    kwargs: dict

    def describe(self) -> str:
        def d(v):
            if torch.is_tensor(v):
                return f"{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
            if isinstance(v, dict):
                return "{" + ", ".join(f"{k}: {d(x)}" for k, x in v.items()) + "}"
            if isinstance(v, (list, tuple)):
                return f"{len(v)} x [" + ", ".join(d(x) for x in v) + "]"
            return repr(v)
        return ", ".join(f"{k}={d(v)}" for k, v in [("sample", self.sample), ("timestep", self.timestep),
                                                    *self.kwargs.items()])


def _clone(v):
    if torch.is_tensor(v):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return v


@functools.lru_cache(None)
def _forward_signature() -> inspect.Signature:
    """diffusers' `UNet2DConditionModel.forward` signature: how pipelines' positional arguments are named."""
    from diffusers import UNet2DConditionModel

    return inspect.signature(UNet2DConditionModel.forward)


def bind_call(args: tuple, kwargs: dict) -> Call:
    bound = _forward_signature().bind(None, *args, **kwargs).arguments
    bound.pop("self")
    # encoder_hidden_states stays even when None (Kandinsky 2.2): it is the forward's required third argument
    kw = {k: _clone(v) for k, v in bound.items()
          if (v is not None or k == "encoder_hidden_states") and k != "return_dict"}
    return Call(kw.pop("sample"), kw.pop("timestep"), kw)


@contextlib.contextmanager
def recording_calls(model: torch.nn.Module):
    """Records every call made to `model` (through its forward hooks) as [(Call, output sample)]."""
    calls: list[tuple[Call, torch.Tensor]] = []
    pending: list[Call] = []

    def pre(module, args, kwargs):
        pending.append(bind_call(args, kwargs))

    def post(module, args, kwargs, output):
        calls.append((pending.pop(), output[0].detach().clone()))

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def record_first_call(pipe, case: Case) -> tuple[np.ndarray, Call]:
    """Run the pipeline once (its reference output) while recording the first call it makes to pipe.unet."""
    with recording_calls(pipe.unet) as calls:
        out = run(pipe, case)
    assert calls, f"{case.name}: the pipeline never called its unet"
    return out, calls[0][0]


def ours_eager(diffusers_unet):
    """Our eager model with diffusers' config and weights (the README's recipe)."""
    import compiled_unet

    # TODO(issue 10, "parity at the edges"): pass **diffusers_unet.config verbatim once
    # compiled_unet.UNet2DConditionModel accepts diffusers' private keys (`_use_default_values`, ...).
    config = {k: v for k, v in diffusers_unet.config.items() if not k.startswith("_")}
    model = compiled_unet.UNet2DConditionModel(**config)
    model.load_state_dict(diffusers_unet.state_dict())
    return model.eval()


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _inputs_key(v) -> Any:
    """Shapes and dtypes of every tensor input (the timestep's dtype excepted: a compiled UNet takes any
    numeric timestep); values of the rest."""
    if torch.is_tensor(v):
        return ("tensor", tuple(v.shape), str(v.dtype))
    if isinstance(v, dict):
        return tuple(sorted((k, _inputs_key(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_inputs_key(x) for x in v)
    return repr(v)


def structure_key(diffusers_unet, call: Call) -> tuple:
    config = json.dumps({k: v for k, v in diffusers_unet.config.items() if not k.startswith("_")}, sort_keys=True,
                        default=str)
    t = call.timestep
    t_key = ("timestep", tuple(torch.as_tensor(t).shape))
    return (config, _weights_digest(diffusers_unet), _inputs_key(call.sample), t_key, _inputs_key(call.kwargs))


_COMPILED: dict[tuple, Any] = {}
COMPILE_SECONDS: dict[str, float] = {}    # case name that triggered a compile -> seconds (for the report)


def compile_for(diffusers_unet, call: Call, label: str = "") -> Any:
    """`compiled_unet.compile` on exactly the recorded call's inputs; once per (config, weights, input shapes).

    The compile sees the inputs the pipeline itself made, so the graph serves every later step of that
    pipeline (a compiled UNet serves exactly the shapes it was compiled for)."""
    import time

    import compiled_unet

    key = structure_key(diffusers_unet, call)
    if key not in _COMPILED:
        kwargs = dict(call.kwargs)
        ehs = kwargs.pop("encoder_hidden_states", None)
        start = time.perf_counter()
        _COMPILED[key] = compiled_unet.compile(diffusers_unet, call.sample, call.timestep, ehs, **kwargs)
        COMPILE_SECONDS[label or str(len(_COMPILED))] = time.perf_counter() - start
    return _COMPILED[key]


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------ exploration

class _Reads:
    """Records attribute reads on an object (dotted paths), delegating everything to it.

    `__class__` answers the target's class, so pipelines' isinstance checks see the real model."""

    def __init__(self, target, path: str, log: set):
        object.__setattr__(self, "_t", target)
        object.__setattr__(self, "_p", path)
        object.__setattr__(self, "_log", log)

    @property
    def __class__(self):  # noqa: D401
        return type(object.__getattribute__(self, "_t"))

    def __getattr__(self, name):
        path = f"{self._p}.{name}"
        try:
            value = getattr(self._t, name)
        except AttributeError:
            self._log.add(path + " (probed, absent)")  # hasattr(...) checks: the answer must stay "absent"
            raise
        if isinstance(value, torch.nn.Module) or type(value).__name__ == "FrozenDict":
            self._log.add(path)
            return _Reads(value, path, self._log)
        self._log.add(path + "()" if callable(value) and not isinstance(value, type) else path)
        return value

    def __setattr__(self, name, value):
        self._log.add(f"{self._p}.{name} (set)")
        setattr(self._t, name, value)

    def __call__(self, *args, **kwargs):
        self._log.add(f"{self._p}(...)")
        return self._t(*args, **kwargs)

    def __getitem__(self, key):
        self._log.add(f"{self._p}[{key!r}]")
        return self._t[key]

    def __contains__(self, key):
        self._log.add(f"{self._p} contains {key!r}")
        return key in self._t

    def __iter__(self):
        self._log.add(f"{self._p} (iterated)")
        return iter(self._t)

    def __len__(self):
        self._log.add(f"{self._p} (len)")
        return len(self._t)

    def get(self, key, default=None):  # FrozenDict.get
        self._log.add(f"{self._p}.get({key!r})")
        return self._t.get(key, default)


def record_unet_reads(case: Case) -> list[str]:
    """Every attribute / method path the pipeline reads from `pipe.unet` during one call (not a test)."""
    pipe = case.build()
    log: set = set()
    pipe.unet = _Reads(pipe.unet, "unet", log)
    run(pipe, case)
    return sorted(log)


if __name__ == "__main__":  # python tests/pipeline_cases.py [case ...]: the pipe.unet reads per case
    import sys

    names = sys.argv[1:] or list(CASES)
    union: set = set()
    for n in names:
        reads = record_unet_reads(CASES[n])
        union.update(reads)
        print(f"{n}: {', '.join(reads)}")
    print(f"union: {', '.join(sorted(union))}")
