"""The runtime of compiled UNets: the one Signature (timesteps, positional calls, check_finite), no silent wrong
answer from damaged artifacts, wrong weights or concurrent calls, the meta skeleton pipelines read, FreeU changed
on a compiled graph without a recompile, and atomic saves into folders that do not exist yet.

Cheap tests need no compile; the others share tests/compiled_fixtures.py's artifacts plus one FreeU compile.
Tolerance for compiled fp32 vs eager: max-abs <= 1e-4 x output scale (assert_close_to_eager).
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
import time
import zipfile

import pytest
import torch

import compiled_unet
from cases import build, inputs_for
from compiled_fixtures import (assert_close_to_eager, bucket_example, bundle_dir, compiled_buckets,  # noqa: F401
                               compiled_jit, inductor_cache_files, swappable_aot, tiny_model)
from compiled_unet.errors import DamagedArtifact
from compiled_unet.runtime import Signature


def _eager(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _signature(batch=2, timestep_dtype=torch.float32):
    sample = torch.randn(batch, 4, 8, 8)
    return Signature.from_call((sample, torch.zeros(batch, dtype=timestep_dtype)),
                               {"encoder_hidden_states": torch.randn(batch, 5, 8), "return_dict": False})


# --------------------------------------------------------------------------------------------------
# Signature (no compile)

def test_fractional_timesteps_are_kept_exactly():
    sig = _signature()
    for t in (10.5, torch.tensor(10.5), torch.tensor([10.5, 981.25]), torch.tensor([10.5, 3.0], dtype=torch.float64)):
        args, _ = sig.bind(torch.randn(2, 4, 8, 8), t, torch.randn(2, 5, 8))
        assert args[1].dtype == torch.float32
        assert args[1][0].item() == 10.5
    args, _ = sig.bind(torch.randn(2, 4, 8, 8), torch.tensor([7, 9]), torch.randn(2, 5, 8))  # ints convert exactly
    assert args[1].tolist() == [7.0, 9.0]


def test_integer_timestep_graph_refuses_fractional_values():
    sig = _signature(timestep_dtype=torch.int64)
    args, _ = sig.bind(torch.randn(2, 4, 8, 8), 10.0, torch.randn(2, 5, 8))  # integral: fine
    assert args[1].tolist() == [10, 10]
    with pytest.raises(ValueError, match="fractional.*truncated"):
        sig.bind(torch.randn(2, 4, 8, 8), 10.5, torch.randn(2, 5, 8))


def test_positional_and_keyword_calls_bind_alike():
    sig = _signature()
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    a1, k1 = sig.bind(x, 3, e)
    a2, k2 = sig.bind(x, timestep=3, encoder_hidden_states=e)
    assert torch.equal(a1[1], a2[1]) and k1["encoder_hidden_states"] is k2["encoder_hidden_states"]
    assert k1["return_dict"] is False  # a constant leaf left out of the call takes the compiled value
    with pytest.raises(TypeError, match="both positionally and as a keyword"):
        sig.bind(x, 3, e, encoder_hidden_states=e)
    with pytest.raises(TypeError, match="unexpected input 'encoder_states'"):
        sig.bind(x, 3, encoder_states=e)
    with pytest.raises(ValueError, match=r"compiled without \['class_labels'\]"):
        sig.bind(x, 3, e, torch.tensor([1, 2]))


def test_check_finite_names_the_input():
    sig = _signature()
    e = torch.randn(2, 5, 8)
    e[1, 2, 3] = float("nan")
    sig.bind(torch.randn(2, 4, 8, 8), 3, e)  # off by default: NaN propagates as in eager
    with pytest.raises(ValueError, match="encoder_hidden_states contains NaN or inf"):
        sig.bind(torch.randn(2, 4, 8, 8), 3, e, check_finite=True)
    x = torch.randn(2, 4, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="sample contains NaN or inf"):
        sig.bind(x, 3, torch.randn(2, 5, 8), check_finite=True)


def test_signature_json_round_trip():
    sig = _signature()
    assert Signature.from_json(sig.to_json()) == sig
    args, kwargs = sig.random_inputs(seed=1)
    sig.bind(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Artifacts: damaged, foreign and missing (no compile)

@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(200)])
def test_random_or_empty_file_is_named_as_damaged(tmp_path, content):
    path = tmp_path / "unet.pt2"
    path.write_bytes(content)
    with pytest.raises(DamagedArtifact, match=str(path)):
        compiled_unet.load(path)


def test_foreign_zip_and_foreign_folders(tmp_path):
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.txt", "hello")
    with pytest.raises(DamagedArtifact, match="not a compiled UNet package"):
        compiled_unet.load(path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DamagedArtifact, match="not a compiled UNet artifact"):
        compiled_unet.load(tmp_path / "folder")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(DamagedArtifact, match="damaged bucket bundle manifest"):
        compiled_unet.load(bundle)
    (bundle / "manifest.json").write_text('{"format": "compiled_unet.buckets/1", "buckets": ["bucket_0.pt2"]}')
    with pytest.raises(DamagedArtifact, match="missing"):
        compiled_unet.load(bundle)
    xla_dir = tmp_path / "hlo"
    xla_dir.mkdir()
    (xla_dir / "compiled_unet_xla.json").write_text("[]")
    with pytest.raises((DamagedArtifact, RuntimeError), match="damaged|XLA environment missing"):
        compiled_unet.load(xla_dir)
    with pytest.raises(FileNotFoundError, match="no compiled UNet"):
        compiled_unet.load(tmp_path / "missing.pt2")


# --------------------------------------------------------------------------------------------------
# Compiled (shared fixtures)

pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_truncated_and_corrupted_packages_are_named(tmp_path, bundle_dir):
    data = open(os.path.join(bundle_dir, "bucket_0.pt2"), "rb").read()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedArtifact, match="truncated.pt2"):
        compiled_unet.load(truncated)
    corrupt = bytearray(data)
    with zipfile.ZipFile(os.path.join(bundle_dir, "bucket_0.pt2")) as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size)  # the compiled code and weights
    # Flip bits in the middle of that member's data (past its local header: name and extra-field lengths at
    # offsets 26 and 28; bytes outside members, e.g. alignment padding, are never read). The zip checksums
    # catch it; AOTInductor itself would load the flipped code or weights without a word.
    name_len, extra_len = (int.from_bytes(corrupt[biggest.header_offset + k:biggest.header_offset + k + 2], "little")
                           for k in (26, 28))
    middle = biggest.header_offset + 30 + name_len + extra_len + biggest.file_size // 2
    corrupt[middle:middle + 64] = bytes(b ^ 0xFF for b in corrupt[middle:middle + 64])
    (tmp_path / "corrupt.pt2").write_bytes(bytes(corrupt))
    with pytest.raises(DamagedArtifact, match="corrupt.pt2"):
        compiled_unet.load(tmp_path / "corrupt.pt2")


def _bucket0_output(loaded) -> torch.Tensor:
    ex = bucket_example(0)
    return loaded(ex.pop("sample"), ex.pop("timestep"), **ex).sample


@pytestmark_slow
def test_package_library_is_extracted_once_and_a_file_is_trusted_only_while_unchanged(tmp_path, bundle_dir,
                                                                                        monkeypatch):
    """A plain CPU package runs from its library extracted once into the cache; the same file (device, inode,
    size, mtime) loads again without reading the library, and so does a file `save` copied from a loaded package;
    a copy made by anyone else or a touched file has its library's bytes checked again (no second extraction);
    every load's output is bitwise equal to torch's own loader's."""
    from compiled_unet.backends import aoti_library, inductor

    monkeypatch.setenv("COMPILED_UNET_CACHE_DIR", str(tmp_path / "cache"))
    checked = []
    real = aoti_library._verify_or_extract
    monkeypatch.setattr(aoti_library, "_verify_or_extract", lambda *a: (checked.append(a[0]), real(*a)))
    first = shutil.copy(os.path.join(bundle_dir, "bucket_0.pt2"), str(tmp_path / "a.pt2"))
    loaded = compiled_unet.load(first)
    libs = os.listdir(tmp_path / "cache" / "aoti" / "lib")
    assert isinstance(loaded._runner.model, aoti_library.LibraryModel)
    assert checked == [first] and len(libs) == 1
    again = compiled_unet.load(first)
    assert checked == [first], "an unchanged file was read again"
    copy = shutil.copy(first, str(tmp_path / "b.pt2"))
    from_copy = compiled_unet.load(copy)
    assert checked == [first, copy] and os.listdir(tmp_path / "cache" / "aoti" / "lib") == libs
    # A file saved from a loaded package is a copy compiled_unet made of verified bytes: trusted from the start
    # (it was written as a temporary and renamed), and so is the same file renamed again.
    saved = compiled_unet.save(loaded, tmp_path / "saved.pt2")
    from_saved = compiled_unet.load(saved)
    moved = str(tmp_path / "moved.pt2")
    os.replace(saved, moved)
    compiled_unet.load(moved)
    assert checked == [first, copy], "a saved or renamed package was read again"
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    compiled_unet.load(first)
    assert checked == [first, copy, first], "a file with a new modification time was trusted without a check"
    with open(moved, "r+b") as f:  # rewritten in place, same size: a new modification time, read again
        f.write(f.read(4))
    compiled_unet.load(moved)
    assert checked == [first, copy, first, moved]

    monkeypatch.setattr(inductor, "load_library_model", lambda path: None)
    by_torch = compiled_unet.load(first)
    assert not isinstance(by_torch._runner.model, aoti_library.LibraryModel)
    reference = _bucket0_output(by_torch)
    for other in (loaded, again, from_copy, from_saved):
        assert torch.equal(_bucket0_output(other), reference)


@pytestmark_slow
def test_a_package_saved_with_a_changed_document_is_rewritten_and_still_trusted(tmp_path, compiled_buckets,
                                                                                 monkeypatch):
    """Saving a package whose document changed (e.g. new FreeU scales) rewrites it, the library streamed with its
    checksum checked; the rewritten file holds the new document, the same library, and loads without being read
    again, to the same output."""
    from compiled_unet.backends import aoti_library
    from compiled_unet.backends.inductor import read_package_doc

    bucket = compiled_buckets.buckets[0]
    path = str(tmp_path / "changed.pt2")
    bucket._runner.save(path, {"note": "a changed document"})
    assert read_package_doc(path)["note"] == "a changed document"
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    assert aoti_library.library_key(path) == aoti_library.library_key(bucket._runner.package_path)
    checked = []
    real = aoti_library._verify_or_extract
    monkeypatch.setattr(aoti_library, "_verify_or_extract", lambda *a: (checked.append(a[0]), real(*a)))
    loaded = compiled_unet.load(path)
    assert checked == []
    assert torch.equal(_bucket0_output(loaded), _bucket0_output(bucket))


@pytestmark_slow
def test_a_package_with_members_the_fast_path_does_not_know_goes_through_torchs_loader(tmp_path, bundle_dir,
                                                                                          monkeypatch):
    from compiled_unet.backends import aoti_library

    monkeypatch.setenv("COMPILED_UNET_CACHE_DIR", str(tmp_path / "cache"))
    src = os.path.join(bundle_dir, "bucket_0.pt2")
    extended = tmp_path / "extended.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(extended, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
        model_dir = next(i.filename for i in zin.infolist() if i.filename.endswith(".so")).rsplit("/", 1)[0]
        zout.writestr(model_dir + "/kernel.cubin", b"\0" * 16)  # a CUDA-style kernel binary
    loaded = compiled_unet.load(extended)
    assert not isinstance(loaded._runner.model, aoti_library.LibraryModel)
    assert not (tmp_path / "cache" / "aoti" / "lib").exists()
    assert torch.equal(_bucket0_output(loaded), _bucket0_output(compiled_unet.load(src)))


@pytestmark_slow
def test_an_unwritable_cache_falls_back_to_torchs_loader_with_a_warning(tmp_path, bundle_dir, monkeypatch):
    from compiled_unet.backends import aoti_library

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("COMPILED_UNET_CACHE_DIR", str(blocker))
    src = os.path.join(bundle_dir, "bucket_0.pt2")
    with pytest.warns(RuntimeWarning, match="cannot cache the compiled library.*COMPILED_UNET_CACHE_DIR"):
        loaded = compiled_unet.load(src)
    assert not isinstance(loaded._runner.model, aoti_library.LibraryModel)
    monkeypatch.setenv("COMPILED_UNET_CACHE_DIR", str(tmp_path / "cache"))
    assert torch.equal(_bucket0_output(loaded), _bucket0_output(compiled_unet.load(src)))


@pytestmark_slow
def test_save_creates_missing_folders_and_leaves_no_temporary(tmp_path, compiled_buckets):
    target = tmp_path / "new" / "deeper" / "unet.pt2"
    assert compiled_unet.save(compiled_buckets.buckets[0], target) == str(target)
    assert os.listdir(target.parent) == ["unet.pt2"]
    bundle = compiled_unet.save(compiled_buckets, tmp_path / "other" / "bundle")
    assert sorted(os.listdir(bundle)) == ["bucket_0.pt2", "bucket_1.pt2", "manifest.json"]
    assert os.listdir(tmp_path / "other") == ["bundle"]


@pytestmark_slow
def test_concurrent_calls_then_an_unrelated_torch_compile(tiny_model, compiled_jit):
    """4 threads x 25 calls with different inputs: every output equals eager; afterwards torch.compile of an
    unrelated function still compiles in this process (no process-global state was left changed)."""
    model, (sample, timestep), kwargs = tiny_model
    ehs = kwargs["encoder_hidden_states"]
    results, errors = {}, []

    def worker(k):
        try:
            for i in range(25):
                x = sample * (0.5 + 0.1 * k) + 0.01 * i
                results[(k, i)] = (x, compiled_jit(x, timestep + i, ehs).sample)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 100
    for (k, i), (x, out) in list(results.items())[::7]:
        assert_close_to_eager(out, _eager(model, x, timestep + i, ehs))
    double = torch.compile(lambda a: a * 2 + 1, backend="eager", fullgraph=True)
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 3.0))


@pytestmark_slow
def test_skeleton_answers_what_pipelines_read(tiny_model, compiled_jit):
    model = tiny_model[0]
    c = compiled_jit
    assert c.time_embedding.linear_1.in_features == model.time_embedding.linear_1.in_features
    assert [type(b).__name__ for b in c.down_blocks] == [type(b).__name__ for b in model.down_blocks]
    assert type(c.mid_block).__name__ == type(model.mid_block).__name__
    assert set(c.attn_processors) == set(model.attn_processors)
    assert c.encoder_hid_proj is None and model.encoder_hid_proj is None
    assert all(p.device.type == "meta" for p in c.up_blocks.parameters())  # no weights held twice
    assert list(c.parameters()) == []
    with pytest.raises(AttributeError):
        c.not_an_attribute
    assert c.to("cpu") is c and c.to(torch.float32) is c
    with pytest.raises(ValueError, match="compiled for cpu float32"):
        c.to(torch.float16)
    with pytest.raises(RuntimeError, match="compile again"):
        c.set_attn_processor(None)
    c.fuse_qkv_projections()  # the fuse_qkv pass fused them already
    c.unfuse_qkv_projections()


@pytestmark_slow
def test_loaded_package_refuses_wrong_weights_and_keeps_the_old_ones(tmp_path, swappable_aot):
    compiled, path = swappable_aot
    loaded = compiled_unet.load(path)
    ex = bucket_example(0)
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    before = loaded(sample, timestep, **ex).sample.clone()
    good = compiled.derive_weights(build("sd", seed=3).state_dict())
    name = next(n for n, v in good.items() if v.ndim == 2)
    for bad, message in (({**good, name: good[name].T.contiguous()}, "shape|holds"),
                         ({**good, name: good[name].double()}, "float64"),
                         ({**good, name: "weights"}, "str"),
                         ({**good, "no.such.weight": good[name]}, "not weights of this compiled graph")):
        with pytest.raises(ValueError, match=message):
            loaded.swap_weights(bad)
        assert torch.equal(loaded(sample, timestep, **ex).sample, before)  # untouched after the refusal


@functools.lru_cache(None)
def _freeu_model_and_compiled():
    model = build("sd")
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    return model, (sample, timestep), kwargs, compiled_unet.compile(model, sample, timestep, **kwargs)


@pytestmark_slow
def test_freeu_changes_on_the_compiled_graph_without_recompile():
    """Compiled with FreeU (CPU defaults: weights packed in the graph, constant folding by our passes): the
    scales are graph inputs, so enable_freeu/disable_freeu on the compiled UNet match eager with the same
    scales, with no new compiled code."""
    model, (sample, timestep), kwargs, compiled = _freeu_model_and_compiled()
    assert compiled.options.prepack_weights
    assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, _eager(model, sample, timestep, **kwargs))
    files = inductor_cache_files()
    for scales in (dict(s1=1.0, s2=0.5, b1=1.1, b2=1.0), dict(s1=0.6, s2=0.9, b1=1.5, b2=1.3)):
        model.enable_freeu(**scales)
        compiled.enable_freeu(**scales)
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, _eager(model, sample, timestep, **kwargs))
    model.disable_freeu()
    compiled.disable_freeu()
    assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, _eager(model, sample, timestep, **kwargs))
    assert inductor_cache_files() == files


@pytestmark_slow
def test_freeu_needs_freeu_in_the_graph(compiled_jit):
    with pytest.raises(RuntimeError, match="no FreeU in its graph"):
        compiled_jit.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    compiled_jit.disable_freeu()  # already off: nothing to do


def _fake_library(lib_root, name: str, size: int, age_s: float) -> None:
    folder = lib_root / name
    folder.mkdir(parents=True)
    (folder / "model.so").write_bytes(b"\0" * size)
    t = time.time() - age_s
    os.utime(folder, (t, t))


def test_library_cache_keeps_the_most_recent_within_its_byte_budget(tmp_path, monkeypatch):
    """The cache is bounded in bytes as well as in count (SD1.5 libraries are 3.4 GB each: eight of them filled a
    disk): pruning keeps the newest libraries that fit, drops everything older than the first that does not, makes
    room before an extraction, and never drops the library just loaded even when it alone exceeds the budget."""
    from compiled_unet.backends import aoti_library

    lib_root = tmp_path / "lib"
    monkeypatch.setenv("COMPILED_UNET_CACHE_MAX_GB", str(10_000 / 1e9))  # a 10 kB budget
    for name, size, age in [("new", 3000, 1), ("mid", 4000, 2), ("old", 4000, 3), ("oldest", 100, 4)]:
        _fake_library(lib_root, name, size, age)
    aoti_library._prune(str(lib_root))
    assert sorted(os.listdir(lib_root)) == ["mid", "new"]  # old would overflow: it and everything older go

    aoti_library._prune(str(lib_root), incoming_bytes=5000)  # room for a 5 kB library about to be written
    assert os.listdir(lib_root) == ["new"]

    _fake_library(lib_root, "huge", 20_000, 10)  # just extracted, alone over the budget, oldest mtime
    aoti_library._prune(str(lib_root), keep="huge")
    assert os.listdir(lib_root) == ["huge"]

    monkeypatch.setenv("COMPILED_UNET_CACHE_MAX_GB", "lots")
    with pytest.warns(RuntimeWarning, match="COMPILED_UNET_CACHE_MAX_GB='lots'"):
        assert aoti_library.max_cache_bytes() == int(aoti_library.DEFAULT_MAX_GB * 1e9)
