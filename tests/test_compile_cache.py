"""``model.compile_cache``: torch.compile's artifacts published by the first actor and loaded by the next
(``pipeline.models.compile_cache``). The real round trip uses inductor on a one-kernel function, so it stays
quick; ``bench/compile_cache.py`` measures whole actors' warm-ups."""
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from pipeline.config import ModelConfig
from pipeline.models.compile_cache import CompileCache, cache_key

pytestmark = pytest.mark.timeout(300)


def fake_model(model_id="m"):
    return SimpleNamespace(model_id=model_id, device=torch.device("cpu"), savings={})


def test_keys_follow_what_changes_compiled_code():
    m, cfg = fake_model("builtin-digits-abc"), ModelConfig(compile=True)
    key = cache_key(m, cfg, [8, 4, 2, 1])
    assert key.startswith("builtin-digits-abc-") and key == cache_key(m, ModelConfig(compile=True, threads=3), [8, 4, 2, 1])
    assert key != cache_key(m, cfg, [4, 2, 1]) and key != cache_key(m, ModelConfig(compile=True, dtype="float16"),
                                                                    [8, 4, 2, 1])
    assert key != cache_key(fake_model("other"), cfg, [8, 4, 2, 1])


def test_the_first_actor_publishes_and_the_next_loads_so_inductor_hits_its_cache(tmp_path, monkeypatch):
    store = f"file://{tmp_path / 'store'}"                 # a URL: the artifacts only
    fn = lambda x: (x * 3).sin() + 1         # noqa: E731

    def actor(inductor_dir):
        """An actor's warm-up in a fresh inductor cache folder (as on another node), in this process."""
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / inductor_dir))
        torch._dynamo.reset()
        with CompileCache(store, "k") as cache:
            torch.compile(fn, backend="inductor")(torch.ones(4))
        return cache, dict(dynamo_utils.counters["inductor"])
    first, before = actor("node1")
    assert (first.loaded, first.saved) == (False, True) and (tmp_path / "store" / "k.torchcompile").is_file()
    second, after = actor("node2")
    assert (second.loaded, second.saved) == (True, False)
    assert after["fxgraph_cache_hit"] == before.get("fxgraph_cache_hit", 0) + 1


def test_no_url_does_nothing_and_an_unreadable_store_means_a_cold_compile(tmp_path, caplog):
    with CompileCache(None, "k") as cache:
        pass
    assert (cache.loaded, cache.saved) == (False, False)
    (tmp_path / "k.torchcompile").write_bytes(b"not artifacts")
    with CompileCache(str(tmp_path), "k") as cache:
        pass
    assert not cache.loaded and "not loaded" in caplog.text


def test_a_local_folder_is_also_inductors_own_cache(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "default"))
    with CompileCache(str(tmp_path / "shared"), "k"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared" / "inductor")
    with CompileCache(f"file://{tmp_path / 'url'}", "k"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared" / "inductor")   # a URL leaves it
