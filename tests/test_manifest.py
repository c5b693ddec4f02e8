"""Manifests: formats, defaults, keys and seeds, extra columns, templates and clear errors."""
import json
import tracemalloc

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestError, Template, plan
from pipeline.request import resolver_for
from pipeline.storage import OutputDir
from conftest import job_config
ROWS = [
    {"prompt": "digit 3", "seed": 7, "key": "a", "style": "bold"},
    {"prompt": "seven", "guidance_scale": 5.0, "sampler": "euler", "steps": 4},
    {"prompt": "2", "num_images": 3, "key": "multi", "negative_prompt": "digit 5", "height": 24, "width": 40},
]


def staged_rows(cfg, tmp_path):
    resolver = resolver_for(cfg)
    p = plan(cfg, OutputDir(str(tmp_path / "out")), resolver)
    return p, [r for s in range(p.num_shards) for r in p.read_shard(s, resolver).to_pylist()]


def write_manifest(tmp_path, fmt, rows):
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows])
        pq.write_table(table, path) if fmt == "parquet" else pacsv.write_csv(table, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_rows_are_normalised_the_same_from_every_format(tmp_path, fmt):
    cfg = job_config(tmp_path, write_manifest(tmp_path, fmt, ROWS), **{"manifest.seed": 100})
    p, rows = staged_rows(cfg, tmp_path)
    assert p.num_rows == 5 and p.num_shards == 1
    assert [r["key"] for r in rows] == ["a", "000000001", "multi_0", "multi_1", "multi_2"]
    # explicit seed kept; missing seed = job seed + row index; num_images counts up from the seed
    assert [r["seed"] for r in rows] == [7, 101, 102, 103, 104]
    assert rows[1]["guidance_scale"] == 5.0 and rows[1]["sampler"] == "euler" and rows[1]["nfe"] == 4
    assert rows[0]["guidance_scale"] == cfg.defaults.guidance_scale and rows[0]["nfe"] == cfg.sampler.nfe
    assert (rows[2]["height"], rows[2]["width"], rows[2]["negative_prompt"]) == (24, 40, "digit 5")
    assert json.loads(rows[0]["extra"]) == {"style": "bold"}
    assert all(r["source_row"] == 2 for r in rows[2:])


def test_shards_hold_consecutive_rows(tmp_path):
    path = write_manifest(tmp_path, "jsonl", [{"prompt": str(i % 10)} for i in range(20)])
    p, rows = staged_rows(job_config(tmp_path, path, **{"output.rows_per_shard": 8}), tmp_path)
    assert p.num_shards == 3 and [p.shard_rows(s) for s in range(3)] == [8, 8, 4]
    assert [r["row"] for r in rows] == list(range(20))
    assert [r["shard"] for r in rows] == [0] * 8 + [1] * 8 + [2] * 4


def test_limit_keeps_the_first_rows(tmp_path):
    path = write_manifest(tmp_path, "jsonl", [{"prompt": "1", "num_images": 4}] * 5)
    p, rows = staged_rows(job_config(tmp_path, path, **{"manifest.limit": 6}), tmp_path)
    assert p.num_rows == 6 and [r["row"] for r in rows] == list(range(6))


@pytest.mark.parametrize("row, field", [
    ({"seed": 1}, "prompt"),
    ({"prompt": "digit 1", "seed": "abc"}, "seed"),
    ({"prompt": "digit 1", "seed": -1}, "seed"),
    ({"prompt": "digit 1", "guidance_scale": "NaN"}, "guidance_scale"),
    ({"prompt": "digit 1", "num_images": 0}, "num_images"),
    ({"prompt": "digit 1", "sampler": "magic"}, "sampler"),
    ({"prompt": "digit 1", "nfe": 3, "steps": 4}, "nfe"),
    ({"prompt": "a cat"}, "prompt"),
    ({"prompt": "digit 1", "negative_prompt": "digits 1 and 2"}, "negative_prompt"),
    ({"prompt": "digit 1", "height": 4}, "height"),
    ({"prompt": "digit 1", "key": "a.b"}, "key"),
    ({"prompt": "digit 1", "key": "../etc"}, "key"),
])
def test_a_bad_row_names_file_row_and_field(tmp_path, row, field):
    path = write_manifest(tmp_path, "jsonl", [{"prompt": "digit 0"}, {"prompt": "digit 2"}, row])
    with pytest.raises(ManifestError) as e:
        staged_rows(job_config(tmp_path, path), tmp_path)
    msg = str(e.value)
    assert path in msg and "row 2" in msg and repr(field) in msg


@pytest.mark.parametrize("third", ["not json", '{"prompt": "digit 1", "seed": "abc"}', '["a list"]'])
def test_rows_are_numbered_from_0_in_every_error_blank_lines_not_counted(tmp_path, third):
    """The same (third) row is "row 2" whether it is not JSON, not an object or has a bad field; the
    file line is only an extra hint."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "digit 0"}\n\n{"prompt": "digit 2"}\n' + third + "\n")
    with pytest.raises(ManifestError, match=r"row 2\b") as e:
        staged_rows(job_config(tmp_path, str(path)), tmp_path)
    assert e.value.row == 2 and "line 3" not in str(e.value) and "row 3" not in str(e.value)


def test_a_huge_refused_value_is_echoed_cut_to_200_characters(tmp_path):
    path = write_manifest(tmp_path, "jsonl", [{"prompt": "digit 1", "key": "k" * 1_000_000}])
    with pytest.raises(ManifestError) as e:
        staged_rows(job_config(tmp_path, path), tmp_path)
    assert len(str(e.value)) < 1000 and "(1000002 characters)" in str(e.value)
    path = write_manifest(tmp_path, "jsonl", [{"prompt": "a cat " * 200_000}])
    with pytest.raises(ManifestError) as e:
        staged_rows(job_config(tmp_path, path), tmp_path)
    assert len(str(e.value)) < 1000 and "(1200002 characters)" in str(e.value)


def test_duplicate_keys_are_refused(tmp_path):
    path = write_manifest(tmp_path, "jsonl", [{"prompt": "1", "key": "k"}, {"prompt": "2", "key": "k"}])
    with pytest.raises(ManifestError, match="row 1.*duplicate key 'k'"):
        staged_rows(job_config(tmp_path, path), tmp_path)


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{\"prompt\": \"1\"}\nnot json\n", r"row 1 \(line 2\): not valid JSON"),
    ("[1, 2]\n", "expected a JSON object"),
    ("", "no valid rows"),
])
def test_unreadable_manifests_are_named(tmp_path, content, match):
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=match) as e:
        staged_rows(job_config(tmp_path, str(path)), tmp_path)
    assert str(path) in str(e.value)


def test_unknown_format_is_refused(tmp_path):
    (tmp_path / "m.txt").write_text("digit 1\n")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        staged_rows(job_config(tmp_path, str(tmp_path / "m.txt")), tmp_path)


def test_template_expands_lazily_and_cycles_through_combinations(tmp_path):
    cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'", "manifest.values": "{d: [0,1,2,3,4,5,6,7,8,9], guidance_scale: [2.0, 4.0]}",
                                        "manifest.count": 100_000, "output.rows_per_shard": 1000})
    tracemalloc.start()
    resolver = resolver_for(cfg)
    p = plan(cfg, OutputDir(str(tmp_path / "unused")), resolver)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert p.num_rows == 2_000_000 and p.num_shards == 2000
    assert peak < 5 * 1024 ** 2                 # nothing proportional to 2M rows was built
    assert not (tmp_path / "unused").exists()
    rows = p.read_shard(1999, resolver).to_pylist()
    assert len(rows) == 1000 and rows[-1]["row"] == 1_999_999
    first = p.read_shard(0, resolver).to_pylist()[:20]
    assert [r["prompt"] for r in first[:4]] == ["digit 0", "digit 0", "digit 1", "digit 1"]
    assert [r["guidance_scale"] for r in first[:4]] == [2.0, 4.0, 2.0, 4.0]
    assert len({(r["prompt"], r["guidance_scale"]) for r in first}) == 20
    assert first[5]["seed"] == cfg.manifest.seed + 5 and first[5]["key"] == "000000005"


def test_template_without_values_for_a_field_is_refused():
    with pytest.raises(ManifestError, match="no values for field"):
        Template("digit {d} in {colour}", {"d": [1]}, 1)
