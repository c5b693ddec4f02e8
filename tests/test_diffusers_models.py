"""The diffusers backend on tiny random-weight pipelines of every family (no hub, no downloads).

Each pipeline is built from configs by ``pipeline.models.tiny``, saved with ``save_pretrained``
and loaded back through the backend's own ``from_pretrained`` path, like a user's folder.
"""
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.manifest import ROW_SCHEMA
from pipeline.request import requests_table, resolver_for
from pipeline.errors import RequestError
from pipeline.models import load_model, model_class, tiny
from pipeline.samplers import sample
from pipeline.samplers.noise import initial_noise, row_generators

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "models"
T5_LEN = 77          # T5 sequence length for the tiny families (the real defaults are 256-512)
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder of the tiny pipeline of a family, built once per test session."""
    built = {}

    def get(family: str) -> str:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            tiny.build(family, folder)
            built[family] = str(folder)
        return built[family]
    return get


def model_cfg(path, **kw):
    return ModelConfig(kind="diffusers", path=path, device="cpu", max_sequence_length=T5_LEN, **kw)


def diffusers_pipe(path):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_images(model, prompts, negatives, scales, seeds, height, width, nfe, method="euler", schedule=None):
    """What the Generator does for one micro-batch, returning float images (as diffusers' np output)."""
    gens = row_generators(seeds)
    noise = initial_noise(gens, model.latent_shape(height, width))
    cond, uncond = model.encode(prompts, negatives)
    den = model.guided_denoiser(cond, uncond, torch.tensor(scales, dtype=torch.float32))
    s_min, s_max = model.sigma_range(height, width)
    x0 = sample(den, noise, method=method, nfe=nfe, sigma_min=s_min, sigma_max=s_max, schedule=schedule,
                generator=gens)
    return model.decode_float(x0).numpy(), noise


# ---------------------------------------------------------------- equivalence with diffusers' own __call__
@pytest.mark.parametrize("family", ["sd", "sd_v", "sdxl"])
def test_vp_families_match_the_diffusers_pipeline(tiny_dir, family):
    """Same model, prompt, seed, Euler on the same sigmas: our image == the pipeline's own output.

    The saved scheduler is EulerDiscrete with linspace spacing, so diffusers' init_noise_sigma is
    sigma_max and its starting latents equal our noise * sigma_max.
    """
    path, nfe, prompt, neg, g = tiny_dir(family), 4, "a red cube", "blurry", 5.0
    model = load_model(model_cfg(path))
    pipe = diffusers_pipe(path)
    pipe.scheduler.set_timesteps(nfe)
    grid = pipe.scheduler.sigmas.clone()
    ours, noise = our_images(model, [prompt], [neg], [g], [11], 32, 32, nfe, schedule=grid)
    theirs = pipe(prompt, negative_prompt=neg, guidance_scale=g, num_inference_steps=nfe, height=32, width=32,
                  latents=noise, output_type="np").images
    assert theirs.shape == ours.shape == (1, 32, 32, 3)
    assert np.abs(theirs - ours).max() < 2e-4
    # a different negative prompt or guidance changes the image: the comparison is not vacuous
    other, _ = our_images(model, [prompt], ["sharp"], [g], [11], 32, 32, nfe, schedule=grid)
    assert np.abs(other - ours).max() > 1e-3


def test_sdxl_empty_negative_prompt_is_zeroed_like_diffusers(tiny_dir):
    path, nfe = tiny_dir("sdxl"), 3
    model, pipe = load_model(model_cfg(path)), diffusers_pipe(path)
    pipe.scheduler.set_timesteps(nfe)
    grid = pipe.scheduler.sigmas.clone()
    ours, noise = our_images(model, ["a tree"], [""], [4.0], [5], 32, 32, nfe, schedule=grid)
    theirs = pipe("a tree", guidance_scale=4.0, num_inference_steps=nfe, height=32, width=32, latents=noise,
                  output_type="np").images          # negative_prompt=None: zeros (force_zeros_for_empty_prompt)
    assert np.abs(theirs - ours).max() < 2e-4


def test_pixart_matches_the_diffusers_pipeline(tiny_dir):
    """T5 embeddings with attention masks and a learned-variance transformer, Euler on the same sigmas."""
    from diffusers import EulerDiscreteScheduler
    path, nfe, prompt, neg, g = tiny_dir("pixart"), 3, "a small house", "dark", 4.5
    model, pipe = load_model(model_cfg(path)), diffusers_pipe(path)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.scheduler.set_timesteps(nfe)
    grid = pipe.scheduler.sigmas.clone()
    ours, noise = our_images(model, [prompt], [neg], [g], [8], 32, 32, nfe, schedule=grid)
    theirs = pipe(prompt, negative_prompt=neg, guidance_scale=g, num_inference_steps=nfe, height=32, width=32,
                  latents=noise, output_type="np", use_resolution_binning=False, max_sequence_length=T5_LEN,
                  clean_caption=False).images
    assert np.abs(theirs - ours).max() < 2e-4


def _flow_grid(pipe, nfe, **kw):
    """diffusers' shifted t grid for ``nfe`` steps from 0.95, as EDM sigmas t/(1-t)."""
    ts = np.linspace(0.95, 0.2, nfe).tolist()
    pipe.scheduler.set_timesteps(sigmas=ts, **kw)
    t = pipe.scheduler.sigmas.to(torch.float64)
    return ts, t / (1 - t)


def test_sd3_matches_the_diffusers_pipeline(tiny_dir):
    path, nfe, prompt, neg, g = tiny_dir("sd3"), 4, "a blue ball", "ugly", 4.0
    model, pipe = load_model(model_cfg(path)), diffusers_pipe(path)
    ts, grid = _flow_grid(pipe, nfe)
    ours, noise = our_images(model, [prompt], [neg], [g], [3], 32, 32, nfe, schedule=grid)
    t0 = float(grid[0] / (1 + grid[0]))
    theirs = pipe(prompt, negative_prompt=neg, guidance_scale=g, num_inference_steps=nfe, sigmas=ts,
                  height=32, width=32, latents=noise * t0, max_sequence_length=T5_LEN, output_type="np").images
    assert np.abs(theirs - ours).max() < 2e-4


def test_flux_guidance_embedding_matches_the_diffusers_pipeline(tiny_dir):
    """Flux-dev style: the row's guidance_scale is the guidance embedding, one branch, no CFG."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    path, nfe, prompt, g = tiny_dir("flux"), 4, "a green leaf", 3.0
    model, pipe = load_model(model_cfg(path)), diffusers_pipe(path)
    assert model.guidance_in_model
    c = pipe.scheduler.config
    mu = calculate_shift((32 // 2 // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ts, grid = _flow_grid(pipe, nfe, mu=mu)
    ours, noise = our_images(model, [prompt], ["ignored"], [g], [4], 32, 32, nfe, schedule=grid)
    t0 = float(grid[0] / (1 + grid[0]))
    packed = pipe._pack_latents(noise * t0, *noise.shape)
    theirs = pipe(prompt, guidance_scale=g, num_inference_steps=nfe, sigmas=ts, height=32, width=32,
                  latents=packed, max_sequence_length=T5_LEN, output_type="np").images
    assert np.abs(theirs - ours).max() < 2e-4
    other, _ = our_images(model, [prompt], [""], [g + 2], [4], 32, 32, nfe, schedule=grid)
    assert np.abs(other - ours).max() > 1e-3        # the guidance value reaches the network


def test_flux_dynamic_shift_follows_resolution(tiny_dir):
    model = load_model(model_cfg(tiny_dir("flux")))
    lo, hi = model.sigma_range(32, 32), model.sigma_range(256, 256)
    assert hi[1] > lo[1] and hi[0] > lo[0]          # more tokens -> larger shift -> noisier grid


# ---------------------------------------------------------------- every family through the Generator
def png(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)))


def rows_table(rows):
    base = {"source_row": 0, "negative_prompt": "", "guidance_scale": 3.0, "nfe": 3, "sampler": "dpmpp_2m",
            "schedule": "karras", "sampler_options": "{}", "final": "zero", "height": 32, "width": 32, "extra": "{}"}
    full = [{**base, "row": i, "key": f"k{i}", **r} for i, r in enumerate(rows)]
    for i, r in enumerate(full):
        r.setdefault("source_row", i)
    return pa.Table.from_pylist(full, schema=ROW_SCHEMA)


FAMILY_PROMPTS = {"dit": ("seven", "3", "two"), "sd": ("a cat", "a dog", "blurry")}


@pytest.mark.parametrize("family", ["sd", "sd_v", "sdxl", "sd3", "flux", "pixart", "dit"])
def test_generator_runs_every_family_batch_independently(tiny_dir, tmp_path, family):
    from pipeline.worker import Generator
    p1, p2, neg = FAMILY_PROMPTS.get(family, FAMILY_PROMPTS["sd"])
    overrides = {"model.kind": "diffusers", "model.path": tiny_dir(family), "model.device": "cpu",
                 "model.max_sequence_length": T5_LEN, "manifest.path": "unused.jsonl", "ray.batch_size": 3,
                 "output.path": str(tmp_path / "out")}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    gen = Generator(cfg)
    rows = [{"seed": 1, "prompt": p1}, {"seed": 2, "prompt": p2, "negative_prompt": neg, "guidance_scale": 6.0},
            {"seed": 1, "prompt": p1, "guidance_scale": 1.0}]
    out = gen.images(rows_table(rows)).to_pylist()
    imgs = [png(r["image"]) for r in out]
    assert all(im.shape == (32, 32, 3) for im in imgs)
    assert json.loads(out[0]["json"])["model_id"].endswith(tiny_dir(family))
    alone = png(gen.images(rows_table(rows[:1])).to_pylist()[0]["image"])
    # a row's image does not depend on its batch (CPU kernels differ by ~1e-6 between batch
    # sizes, which can move a pixel across a rounding boundary: at most one level)
    assert np.abs(alone.astype(int) - imgs[0]).max() <= 1
    if family != "flux":                             # Flux-dev: guidance is an embedding, also per row
        assert np.abs(imgs[0].astype(int) - imgs[2]).max() > 2   # per-row guidance scale reaches the sampler


# ---------------------------------------------------------------- bad input, before any weights
def test_resolution_and_label_checks_run_on_the_driver(tiny_dir):
    sd3 = model_class(model_cfg(tiny_dir("sd3")))
    sd3.check_request("a cat", "", 32, 64)
    with pytest.raises(RequestError, match="height.*multiple of 4"):
        sd3.check_request("a cat", "", 30, 32)
    dit = model_class(model_cfg(tiny_dir("dit")))
    dit.check_request("seven", "", 32, 32)
    dit.check_request("207", "", 32, 32)
    with pytest.raises(RequestError, match="prompt.*unknown class label 'tiger'"):
        dit.check_request("tiger", "", 32, 32)
    generic = model_class("diffusers")                # kind only: VAE factor 8 assumed
    with pytest.raises(RequestError, match="width.*multiple of 8"):
        generic.check_request("x", "", 64, 60)


def test_missing_path_unsupported_pipeline_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"model.path: .*nope does not exist"):
        model_class(model_cfg(str(tmp_path / "nope")))
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"unsupported pipeline class 'KandinskyPipeline'; supported: .*FluxPipeline"):
        model_class(model_cfg(str(tmp_path / "kandinsky")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        model_class(model_cfg("someorg/some-model"))
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["model.kind=diffusers", "manifest.path=x.jsonl"])
    from jobs.generate import main                   # the CLI stops before Ray with exit status 2
    assert main([str(CONFIGS / "sd15.yaml"), f"model.path={tmp_path / 'kandinsky'}",
                 f"output.path={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()


def test_long_prompts_are_truncated_with_a_warning(tiny_dir, caplog):
    model = load_model(model_cfg(tiny_dir("sd")))
    long = "abcdefgh " * 20                          # 160 character tokens for a 77-token tokenizer
    with caplog.at_level(logging.WARNING, logger="pipeline.models.diffusers_backend"):
        cond, _ = model.encode([long], [""])
    assert "truncated to 77 tokens" in caplog.text
    assert cond["encoder_hidden_states"].shape[1] == 77


def test_channels_last_slicing_and_tiling_options_are_accepted(tiny_dir):
    m = load_model(model_cfg(tiny_dir("sd"), channels_last=True, vae_slicing=True, vae_tiling=True))
    assert m.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    imgs, _ = our_images(m, ["a cat"], [""], [2.0], [0], 32, 32, 2)
    assert np.isfinite(imgs).all()


def test_compiled_pipeline_fuses_qkv_compiles_net_and_decoder_and_gives_the_same_images(tiny_dir, tmp_path):
    """``model.compile`` on a diffusers family: fused QKV projections, the UNet and the VAE decoder
    compiled (``eager`` backend: Dynamo tracing and guards, no code generation), warmed up at every padded batch size;
    the images equal the uncompiled model's to float rounding."""
    import torch._dynamo.utils as dynamo_utils

    from pipeline.config import load_config
    from pipeline.request import requests_table, resolver_for
    from pipeline.worker import Generator

    base = ["model.kind=diffusers", f"model.path={tiny_dir('sd')}", "model.device=cpu", "model.dtype=float32",
            "manifest.template=x", "defaults.height=32", "defaults.width=32", "ray.batch_size=4", "model.threads=1"]
    gen = Generator(load_config(None, base + ["model.compile=true", "model.compile_backend=eager"]))
    assert type(gen.model.net).__name__ == "OptimizedModule"
    assert any(type(p).__name__ == "FusedAttnProcessor2_0" for p in gen.model.net.attn_processors.values())
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    resolve = resolver_for(gen.cfg)
    reqs = [resolve({"prompt": p, "seed": i, "nfe": 3}, i, i)[0] for i, p in enumerate(["a cat", "a dog", "a bird"])]
    compiled = gen(requests_table(reqs))                 # 3 rows, padded to 4: no new graph
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    plain = Generator(load_config(None, base))(requests_table(reqs))
    a, b = (np.frombuffer(b"".join(t["pixels"].to_pylist()), np.uint8).astype(int) for t in (compiled, plain))
    assert np.abs(a - b).max() <= 1


# ---------------------------------------------------------------- the real job, through Ray
@pytest.mark.timeout(300)
def test_generate_job_with_a_family_config(ray_session, tiny_dir, tmp_path, write_jsonl):
    from jobs.generate import main
    manifest = write_jsonl([{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "negative_prompt": "blurry",
                                                            "guidance_scale": 5.0}, {"prompt": "a bird"}])
    out = tmp_path / "out"
    rc = main([str(CONFIGS / "sd3.yaml"), f"model.path={tiny_dir('sd3')}", f"manifest.path={manifest}",
               f"output.path={out}", "manifest.template=null", "model.max_sequence_length=77", "defaults.height=32", "defaults.width=32",
               "sampler.nfe=3", "ray.batch_size=2", "ray.actors=1", "model.device=cpu", "model.dtype=float32"])
    assert rc == 0
    import pyarrow.dataset as ds
    table = ds.dataset(str(out / "parquet")).to_table()
    assert table.num_rows == 3
    assert all("StableDiffusion3Pipeline" in m for m in table.column("model_id").to_pylist())
    assert all(len(png(b)) == 32 for b in table.column("image").to_pylist())


def _weights(module) -> dict:
    return {name: (p.dtype, p.data_ptr()) for name, p in module.named_parameters()}


@pytest.mark.parametrize("family, decodes_in", [("sd", torch.float16), ("sdxl", torch.float32)])
def test_an_fp16_vae_decodes_as_the_family_pipeline_does_with_no_weight_cast(tiny_dir, family, decodes_in):
    """SD's pipeline decodes an fp16 VAE in fp16; SDXL's upcasts it (``force_upcast``, the AutoencoderKL
    default): here that choice is made once, at load, so no weight changes dtype (or storage) per batch,
    and the images stay within one level of a float32 decode."""
    m = load_model(model_cfg(tiny_dir(family), dtype="float16"))
    plain = load_model(model_cfg(tiny_dir(family)))
    assert m.vae.config.force_upcast and m.vae.dtype == decodes_in
    before = _weights(m.vae)
    seen, decode = [], m.vae.decode
    m.vae.decode = lambda z, **kw: seen.append(z.dtype) or decode(z, **kw)
    x0 = torch.randn(3, *m.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        images = m.decode(x0.to(torch.float16), 32, 32)
        assert _weights(m.vae) == before
    assert seen == [decodes_in] * 2
    reference = plain.decode(x0, 32, 32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - reference).max() <= 1


def test_an_fp16_vae_measured_to_overflow_decodes_in_float32(tiny_dir):
    """A VAE whose fp16 decoder overflows on the probe latent at load gets a float32 decoder, once."""
    m = load_model(model_cfg(tiny_dir("sd"), dtype="float16"))
    assert m.decode_dtype()[0] == torch.float16
    with torch.no_grad():
        m.vae.decoder.conv_in.weight.mul_(3e4)          # activations beyond fp16's 65504
    dtype, why = m.decode_dtype()
    assert dtype == torch.float32 and "overflow" in why


def test_size_conditions_are_made_once_and_kept_on_the_device(tiny_dir, monkeypatch):
    """SDXL's time ids are built once per size, not copied from the host at every model call."""
    model = load_model(model_cfg(tiny_dir("sdxl")))
    calls = []
    make = model.pipe._get_add_time_ids
    monkeypatch.setattr(model.pipe, "_get_add_time_ids", lambda *a, **k: calls.append(a) or make(*a, **k))
    first, _ = our_images(model, ["a tree"], [""], [4.0], [5], 32, 32, 4)
    second, _ = our_images(model, ["a tree", "a car"], ["", ""], [4.0, 4.0], [5, 6], 32, 32, 4)
    assert len(calls) == 1                                        # 8 model calls, one size
    assert np.abs(second[:1] - first).max() < 1e-5                # batch of 2 vs 1: float rounding only


# ---------------------------------------------------------------- inference-time search
@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random-weight CLIP (model + character tokenizer) saved as the ``clip`` reward loads it."""
    return tiny.build_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.mark.parametrize("family", ["sd", "sd_v", "sdxl", "sd3", "flux", "pixart", "dit"])
def test_search_steers_every_family_with_the_clip_reward(tiny_dir, tiny_clip, tmp_path, family):
    """fk (and svdd on SD) with a tiny CLIP reward on each family: particles share a batch, the kept
    particle has the best CLIP score of its row, and a row's result does not depend on its batch."""
    from pipeline.worker import Generator
    p1, p2, _ = FAMILY_PROMPTS.get(family, FAMILY_PROMPTS["sd"])
    overrides = {"model.kind": "diffusers", "model.path": tiny_dir(family), "model.device": "cpu",
                 "model.max_sequence_length": T5_LEN, "manifest.path": "unused.jsonl", "ray.batch_size": 4,
                 "output.path": str(tmp_path / "out"), "search.reward": "clip",
                 "search.reward_options.path": tiny_clip}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    gen = Generator(cfg)
    resolve = resolver_for(cfg)
    for method in ("fk", "svdd") if family == "sd" else ("fk",):
        search = {"method": method, "particles": 2, "options": {"resample_every": 1} if method == "fk" else {}}
        reqs = [r for i, p in enumerate((p1, p2)) for r in resolve({"prompt": p, "seed": 7 + i, "nfe": 4,
                                                                     "search": search}, i, i)]
        out = gen.images(requests_table(reqs)).to_pylist()
        for r in out:
            meta = json.loads(r["json"])
            assert r["error"] is None, r["error"]
            assert meta["sampler"] == "euler_ancestral" and meta["search"]["method"] == method
            assert len(meta["search_rewards"]) == 2 and meta["search_reward"] == max(meta["search_rewards"])
            assert png(r["image"]).shape == (32, 32, 3)
        alone = gen.images(requests_table(reqs[1:])).to_pylist()[0]
        assert np.abs(png(alone["image"]).astype(int) - png(out[1]["image"])).max() <= 1


# ---------------------------------------------------------------- opt-in savings (model.cache, model.quantize)
def _generator(tiny_dir, tmp_path, family="sd", **extra):
    from pipeline.worker import Generator
    overrides = {"model.kind": "diffusers", "model.path": tiny_dir(family), "model.device": "cpu",
                 "model.max_sequence_length": T5_LEN, "manifest.path": "unused.jsonl", "ray.batch_size": 3,
                 "output.path": str(tmp_path / "out"), "model.threads": 1, **extra}
    return Generator(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_deepcache_runs_the_deep_blocks_every_interval_and_stays_batch_independent(tiny_dir, tmp_path, family):
    gen = _generator(tiny_dir, tmp_path, family, **{"model.cache": "deepcache", "model.cache_interval": 3})
    plain = _generator(tiny_dir, tmp_path, family)
    assert gen.model.savings == {"cache": {"method": "deepcache", "interval": 3}} and plain.model.savings == {}
    deep_calls = []
    for g in (gen, plain):
        g.model.net.mid_block.register_forward_hook(lambda *a: deep_calls.append(1))
    rows = [{"seed": 1, "prompt": "a cat", "nfe": 6}, {"seed": 2, "prompt": "a dog", "nfe": 6},
            {"seed": 3, "prompt": "a bird", "nfe": 6}]
    cached = [png(r["image"]) for r in gen.images(rows_table(rows)).to_pylist()]
    n_cached = len(deep_calls)
    reference = [png(r["image"]) for r in plain.images(rows_table(rows)).to_pylist()]
    assert (n_cached, len(deep_calls) - n_cached) == (2, 6)          # full calls 0 and 3 of 6: a third of the deep work
    error = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(cached, reference)])
    assert 0 < error < 8                                             # mean levels; measured in bench/savings.py
    alone = png(gen.images(rows_table(rows[1:2])).to_pylist()[0]["image"])
    assert np.abs(alone.astype(int) - cached[1]).max() <= 1


def test_the_shallow_branch_on_its_own_deep_feature_is_the_full_unet(tiny_dir):
    m = load_model(model_cfg(tiny_dir("sd"), cache="deepcache"))
    cond, _ = m.encode(["a cat", "a dog"], ["", ""])
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        full, deep = m._full(x, t, cond)
        assert torch.equal(m._shallow(x, t, deep, **cond), full)
        assert not torch.equal(m._shallow(x, t, deep * 1.1, **cond), full)     # the feature reaches the output


def test_deepcache_is_refused_for_transformer_families_naming_the_key(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.cache: StableDiffusion3Pipeline has no UNet"):
        load_config(None, ["model.kind=diffusers", f"model.path={tiny_dir('sd3')}", "model.cache=deepcache",
                           "manifest.path=x.jsonl"])
    with pytest.raises(ConfigError, match="model.cache: unknown method 'magic'"):
        load_config(None, ["model.cache=magic", "manifest.path=x.jsonl"])


def test_fp8_is_refused_without_a_gpu_that_has_it_naming_the_key(tiny_dir, monkeypatch):
    from pipeline.models import savings
    with pytest.raises(ConfigError, match="model.quantize: fp8 needs a CUDA GPU of compute capability >= 8.9"):
        load_config(None, ["model.quantize=fp8", "model.device=cpu", "manifest.path=x.jsonl"])
    with pytest.raises(ConfigError, match="model.quantize: fp8 needs a CUDA GPU"):      # in the actor, at load
        load_model(model_cfg(tiny_dir("sd"), quantize="fp8"))
    with pytest.raises(ConfigError, match="model.quantize: unknown method 'int3'"):
        load_config(None, ["model.quantize=int3", "manifest.path=x.jsonl"])
    # the decision on machines this one is not: a GPU too old, one with FP8, torchao missing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert "NVIDIA A100 has 8.0" in savings.fp8_refusal("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    real_find_spec = savings.importlib.util.find_spec
    monkeypatch.setattr(savings.importlib.util, "find_spec",       # torchao present (the [gpu] extra)
                        lambda name: object() if name == "torchao" else real_find_spec(name))
    assert savings.fp8_refusal("cuda") is None
    monkeypatch.setattr(savings.importlib.util, "find_spec", lambda name: None)
    assert "needs torchao" in savings.fp8_refusal("cuda:0")


def test_fp8_swaps_the_aligned_linear_layers_and_its_numerics_stay_close(tiny_dir):
    """FP8 itself needs a GPU; torchao's fake quantization (``emulate``) gives its numerics on a CPU."""
    pytest.importorskip("torchao")
    from pipeline.models import savings
    m = load_model(model_cfg(tiny_dir("sd")))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, _ = m.encode(["a cat", "a dog"], ["", ""])
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        before = m.call_net(x, t, cond)
    aligned = [n for n, mod in m.net.named_modules() if savings.fp8_layer(mod)]
    assert savings.quantize(m.net, "fp8", "cpu", emulate=True) == len(aligned) > 0
    assert all(type(mod).__name__ == "FakeQuantizedLinear" for n, mod in m.net.named_modules() if n in aligned)
    with torch.no_grad():
        after = m.call_net(x, t, cond)
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.1


def test_compiled_deepcache_warms_up_both_branches_and_gives_the_same_images(tiny_dir, tmp_path):
    """With ``model.compile`` the full UNet (its feature hook inside) and the shallow branch compile in the
    warm-up (``eager`` backend: Dynamo's tracing and guards); no row compiles anything after it."""
    import torch._dynamo.utils as dynamo_utils
    extra = {"model.cache": "deepcache", "model.cache_interval": 2, "ray.batch_size": 2, "defaults.height": 32,
             "defaults.width": 32}
    gen = _generator(tiny_dir, tmp_path, **extra, **{"model.compile": "true", "model.compile_backend": "eager"})
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    rows = [{"seed": 1, "prompt": "a cat", "nfe": 5}, {"seed": 2, "prompt": "a dog", "nfe": 5}]
    compiled = gen(rows_table(rows))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    plain = _generator(tiny_dir, tmp_path, **extra)(rows_table(rows))
    a, b = (np.frombuffer(b"".join(t["pixels"].to_pylist()), np.uint8).astype(int) for t in (compiled, plain))
    assert np.abs(a - b).max() <= 1
