"""The built-in digits model: prompts, packaged weights, and evidence that it draws the digit asked for."""
import numpy as np
import pytest
import torch

from pipeline.models import digits, digits_train
from pipeline.models.base import RequestError
from pipeline.models.builtin import BuiltinDigits
from pipeline.samplers import SAMPLERS
from pipeline.worker import Generator
from conftest import job_config


@pytest.mark.parametrize("prompt, label", [
    ("7", 7), ("digit 7", 7), ("a handwritten Seven", 7), ("the number 0", 0), ("", digits.NULL_CLASS),
    (None, digits.NULL_CLASS), ("digit 3, digit 3", 3),
])
def test_prompts_select_the_class(prompt, label):
    assert digits.parse_label(prompt) == label


@pytest.mark.parametrize("prompt", ["a cat", "17", "digits 1 and 2", "one or two"])
def test_prompts_naming_no_single_digit_are_rejected(prompt):
    with pytest.raises(ValueError, match="one digit"):
        digits.parse_label(prompt)
    with pytest.raises(RequestError) as e:
        BuiltinDigits.check_request(prompt, "", 32, 32)
    assert e.value.field == "prompt"


def test_packaged_weights_load_and_are_small():
    files = sorted(f.name for f in digits.WEIGHTS_DIR.glob("*.safetensors"))
    assert files == ["digits-reward.safetensors", "digits.safetensors"]      # the model and the digits reward
    assert sum((digits.WEIGHTS_DIR / f).stat().st_size for f in files) < 5 * 1024 ** 2
    net = digits.load()
    x = torch.zeros(2, 1, 16, 16)
    out = net.denoise(x, torch.tensor([1.0, 1.0]), torch.tensor([3, digits.NULL_CLASS]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        digits.load(tmp_path)


def test_save_and_load_round_trip(tmp_path):
    net = digits.DigitsNet(digits.DigitsNetConfig(channels=16, emb_dim=32))
    digits_train.save(net, tmp_path, {"note": "test"})
    back = digits.load(tmp_path)
    assert back.cfg == net.cfg
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def generate_digits(tmp_path, per_class, **overrides):
    """Images for 'digit d', d = 0..9, through the same Generator the Ray job uses (in-process)."""
    from pipeline.request import requests_table, resolver_for

    cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'", "ray.batch_size": 100, **overrides})
    resolve = resolver_for(cfg)
    rows = [resolve({"key": f"k{i}", "seed": 10_000 + i, "prompt": f"digit {i % 10}", "height": 32, "width": 32},
                    i, i)[0] for i in range(10 * per_class)]
    out = Generator(cfg).images(requests_table(rows))
    from PIL import Image
    import io
    images = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in out["image"].to_pylist()])
    return images, np.arange(len(rows)) % 10


def test_generated_digits_are_recognised_by_a_classifier_fitted_on_real_digits(tmp_path):
    """At 10 NFE with guidance 3, >= 90% of images are labelled as the requested digit."""
    images, wanted = generate_digits(tmp_path, per_class=30, **{"sampler.nfe": 10, "defaults.guidance_scale": 3.0})
    clf = digits_train.reference_classifier()
    accuracy = float((clf.predict(digits_train.to_digits_features(images)) == wanted).mean())
    print(f"classifier accuracy at 10 NFE: {accuracy:.3f}")
    assert accuracy >= 0.90
    # the images are diverse, not one template per class
    assert len({im.tobytes() for im in images}) == len(images)


def test_unguided_model_is_worse_than_guided(tmp_path):
    """Label dropout made CFG work: guidance 3 is more accurate than guidance 0 (unconditional)."""
    clf = digits_train.reference_classifier()
    acc = {}
    for g in (0.0, 3.0):
        images, wanted = generate_digits(tmp_path, per_class=10, **{"defaults.guidance_scale": g})
        acc[g] = float((clf.predict(digits_train.to_digits_features(images)) == wanted).mean())
    assert acc[0.0] < 0.5 < 0.9 <= acc[3.0]


def _two_rows(cfg, method):
    from pipeline.request import requests_table, resolver_for
    resolve = resolver_for(cfg)
    return requests_table([resolve({"key": f"k{i}", "seed": 7 + i, "prompt": "digit 5", "guidance_scale": 2.0,
                                    "nfe": 6, "sampler": method, "height": 16, "width": 16}, i, i)[0]
                           for i in range(2)])


@pytest.fixture(scope="module")
def all_grids():
    from pipeline.schedules import GRIDS, MODEL_TIME_GRIDS
    return sorted(set(GRIDS) - MODEL_TIME_GRIDS)


@pytest.mark.parametrize("method", sorted(SAMPLERS) + ["auto"])
def test_every_sampler_runs_in_the_generator_from_config(tmp_path, method):
    cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'", "sampler.method": method,
                                        "sampler.nfe": 6})
    out = Generator(cfg).images(_two_rows(cfg, method))
    assert out["error"].to_pylist() == [None, None]
    assert all(out["image"].to_pylist())


def test_every_grid_runs_in_the_generator_from_config(tmp_path, all_grids):
    for grid in all_grids:
        cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'", "sampler.schedule": grid})
        out = Generator(cfg).images(_two_rows(cfg, "dpmpp_2m"))
        assert out["error"].to_pylist() == [None, None], grid


def test_prompt_embeddings_are_encoded_once_per_distinct_pair_and_cached(tmp_path, monkeypatch):
    from pipeline.request import requests_table, resolver_for

    cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'"})
    gen, resolve = Generator(cfg), resolver_for(cfg)
    calls = []
    encode = gen.model.encode
    monkeypatch.setattr(gen.model, "encode", lambda p, n: calls.append(list(zip(p, n))) or encode(p, n))
    rows = [resolve({"prompt": f"digit {i % 3}", "seed": i, "nfe": 4}, i, i)[0] for i in range(9)]
    first = gen.images(requests_table(rows))
    assert calls == [[("digit 0", ""), ("digit 1", ""), ("digit 2", "")]]
    again = gen.images(requests_table(rows))
    assert len(calls) == 1 and again["image"].to_pylist() == first["image"].to_pylist()
    alone = Generator(cfg).images(requests_table(rows[4:5]))          # a fresh actor, one row: the same image
    assert alone["image"].to_pylist() == first["image"].to_pylist()[4:5]


def test_deepcache_on_the_builtin_model_cuts_the_deep_branch_and_keeps_the_digits(tmp_path):
    """``model.cache=deepcache``: the 8x8 branch runs on every 2nd call only, the digits are still
    recognised, and a row's image is bit-identical alone and in a batch."""
    cfg = job_config(tmp_path, None, **{"manifest.template": "digit", "model.cache": "deepcache",
                                        "model.cache_interval": 2, "ray.batch_size": 50})
    gen = Generator(cfg)
    deep = []
    gen.model.net.mid1.register_forward_hook(lambda *a: deep.append(1))
    from pipeline.request import requests_table, resolver_for
    resolve = resolver_for(cfg)
    rows = [resolve({"key": f"k{i}", "seed": 500 + i, "prompt": f"digit {i % 10}", "guidance_scale": 3.0, "nfe": 10,
                     "sampler": "dpmpp_2m", "height": 16, "width": 16}, i, i)[0] for i in range(50)]
    out = gen.images(requests_table(rows))
    assert len(deep) == 5                              # 10 model calls, the deep branch in 5
    from PIL import Image
    import io
    images = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in out["image"].to_pylist()])
    clf = digits_train.reference_classifier()
    assert (clf.predict(digits_train.to_digits_features(images)) == np.arange(50) % 10).mean() >= 0.9
    alone = gen.images(requests_table(rows[7:8]))["image"].to_pylist()[0]
    assert alone == out["image"].to_pylist()[7]


def test_a_guided_denoiser_without_the_feature_cache_runs_the_full_network_every_call(tmp_path):
    gen = Generator(job_config(tmp_path, None, **{"manifest.template": "digit", "model.cache": "deepcache"}))
    m = gen.model
    labels = torch.tensor([3, 5])
    x, sigma = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((2,), 2.0)
    with torch.no_grad():
        full = m.guided_denoiser(labels, labels * 0 + digits.NULL_CLASS, torch.full((2,), 2.0), feature_cache=False)
        cached = m.guided_denoiser(labels, labels * 0 + digits.NULL_CLASS, torch.full((2,), 2.0))
        first = [f(x, sigma) for f in (full, cached)]
        second = [f(x * 0.9, sigma * 0.9) for f in (full, cached)]
    assert torch.equal(first[0], first[1])                 # the cache's first call is a full one
    assert not torch.equal(second[0], second[1])           # its second is shallow; without it, full again


def test_a_guidance_interval_is_run_and_recorded_in_each_images_metadata(tmp_path):
    """``model.guidance_interval`` (an opt-in saving): the images change, each sidecar names the saving
    under ``savings``; without it the sidecar has no such key (outputs of jobs without savings unchanged)."""
    import json

    base = {"manifest.template": "'digit {d}'", "sampler.method": "dpmpp_2m", "sampler.nfe": 6}
    plain = Generator(job_config(tmp_path, None, **base)).images(_two_rows(job_config(tmp_path, None, **base), "dpmpp_2m"))
    cfg = job_config(tmp_path, None, **base, **{"model.guidance_interval": "[0.3,5.0]"})
    out = Generator(cfg).images(_two_rows(cfg, "dpmpp_2m"))
    meta = [json.loads(m) for m in out["json"].to_pylist()]
    assert all(m["savings"] == {"guidance_interval": [0.3, 5.0]} for m in meta)
    assert all("savings" not in json.loads(m) for m in plain["json"].to_pylist())
    assert out["image"].to_pylist() != plain["image"].to_pylist() and out["error"].to_pylist() == [None, None]
