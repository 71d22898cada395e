"""AOTInductor packages cached by content (compiled_unet/backends/package_cache.py): the same program, weights
and options compile once; anything the package depends on changes the key. One small AOT compile (a conv and
a linear); the key tests compile nothing. Compiled vs eager: max-abs <= 1e-4 x scale (closeness.assert_close).
"""
from __future__ import annotations

import os
import shutil
import sys
import zipfile

import pytest
import torch

from cases import ConvLinear
from closeness import assert_close
from compiled_unet.backends import InductorOptions, aoti_library, package_cache
from compiled_unet.backends.inductor import AotRunner


def _program(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvLinear().eval()
    x = torch.randn(1, 8, 8, 8)
    return torch.export.export(model, (x,)), model, x


@pytest.fixture
def package_folder(tmp_path, monkeypatch):
    """An empty package cache and library cache (Inductor's kernel cache stays the session's)."""
    folder = tmp_path / "packages"
    monkeypatch.setattr(package_cache, "folder", lambda: str(folder))
    monkeypatch.setenv("COMPILED_UNET_CACHE_DIR", str(tmp_path / "libraries"))
    monkeypatch.delenv("COMPILED_UNET_PACKAGE_CACHE", raising=False)
    return folder


def test_second_compile_of_the_same_program_is_the_cached_package(package_folder, monkeypatch):
    ep, model, x = _program()
    options = InductorOptions(aot=True).resolve(torch.device("cpu"))
    first = AotRunner.compile(ep, options, {})
    assert len(os.listdir(package_folder)) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again instead of using the cached package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(torch._inductor, "aot_compile", refuse)
    read = []
    real_testzip, real_verify = zipfile.ZipFile.testzip, aoti_library._verify_or_extract
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda z: (read.append("entry"), real_testzip(z))[1])
    monkeypatch.setattr(aoti_library, "_verify_or_extract", lambda *a: (read.append("copy"), real_verify(*a)))
    # The first load checked the package: the entry copied from it is vouched for, so its first reuse reads
    # nothing, and neither does loading the copy handed out.
    (entry,) = [os.path.join(package_folder, name) for name in os.listdir(package_folder)]
    assert aoti_library.is_verified(entry)
    again = AotRunner.compile(_program()[0], options, {})  # exported again: the same content, the same key
    assert read == []
    third = AotRunner.compile(_program()[0], options, {})
    assert read == [], "an unchanged cache entry or the copy made of it was read"
    # An entry this process did not vouch for (a cache copied in from elsewhere) is read once before its use.
    shutil.copyfile(entry, entry + ".incoming")
    os.replace(entry + ".incoming", entry)
    AotRunner.compile(_program()[0], options, {})
    assert read == ["entry"]
    out_first, out_again = first(*first.prepare((x,), {}))[0], again(*again.prepare((x,), {}))[0]
    assert torch.equal(out_first, out_again)
    assert torch.equal(out_first, third(*third.prepare((x,), {}))[0])
    with torch.no_grad():
        assert_close(out_again, model(x)[0])
    # Other weights are another package: with the compiler refused, compiling them must fail.
    with pytest.raises(AssertionError, match="compiled again"):
        AotRunner.compile(_program(seed=1)[0], options, {})


def test_switched_off_by_the_environment(package_folder, monkeypatch):
    monkeypatch.setenv("COMPILED_UNET_PACKAGE_CACHE", "0")
    assert not package_cache.enabled()
    monkeypatch.setenv("COMPILED_UNET_PACKAGE_CACHE", "1")
    assert package_cache.enabled()


def test_key_covers_weights_options_document_and_toolchain(monkeypatch):
    ep = _program()[0]
    key = package_cache.package_key(ep, {"freezing": True}, {"doc": "a"})
    assert key == package_cache.package_key(_program()[0], {"freezing": True}, {"doc": "a"})  # deterministic
    assert key != package_cache.package_key(ep, {"freezing": False}, {"doc": "a"})
    assert key != package_cache.package_key(ep, {"freezing": True}, {"doc": "b"})
    changed = _program()[0]
    with torch.no_grad():
        changed.state_dict["linear.bias"][3] += 1e-7  # one value of one weight
    assert key != package_cache.package_key(changed, {"freezing": True}, {"doc": "a"})
    with monkeypatch.context() as m:
        m.setattr(torch._inductor.config, "epilogue_fusion", not torch._inductor.config.epilogue_fusion)
        assert key != package_cache.package_key(ep, {"freezing": True}, {"doc": "a"})  # a user's global config
    with monkeypatch.context() as m:
        m.setattr(package_cache, "compiler_identity", lambda: ("/usr/bin/other-g++", 1, 2))
        assert key != package_cache.package_key(ep, {"freezing": True}, {"doc": "a"})
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0")
        assert key != package_cache.package_key(ep, {"freezing": True}, {"doc": "a"})
    with monkeypatch.context() as m:  # the same CPU capped to AVX2: other kernels, other packed layouts
        m.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert key != package_cache.package_key(ep, {"freezing": True}, {"doc": "a"})


def test_tensors_the_key_cannot_read_are_not_cached():
    assert package_cache._tensor_bytes(torch.randn(4, 4).to_sparse()) is None
    assert package_cache._tensor_bytes(torch.empty(3, device="meta")) is None
    dense = torch.randn(2, 3)
    assert bytes(package_cache._tensor_bytes(dense.t())) == bytes(package_cache._tensor_bytes(dense.t().contiguous()))
    if torch.backends.mkldnn.is_available():  # oneDNN-packed weights key by their values
        assert bytes(package_cache._tensor_bytes(dense.to_mkldnn())) == bytes(package_cache._tensor_bytes(dense))


def test_a_damaged_cached_package_is_removed_not_used(package_folder, tmp_path):
    os.makedirs(package_folder)
    entry = package_folder / ("0" * 40 + ".pt2")
    entry.write_bytes(b"PK\x03\x04 not really a zip")
    assert package_cache.lookup("0" * 40, str(tmp_path / "out.pt2")) is False
    assert not entry.exists() and not (tmp_path / "out.pt2").exists()


def test_keying_a_weight_leaves_it_freeable():
    """The key reads each weight's bytes in place, without a numpy view (which would mark the storage as not
    resizable for good, and `compile(..., donate_weights=True)` could then not free the model's weights)."""
    weight = torch.randn(3, 4)
    data = package_cache._tensor_bytes(weight)
    assert bytes(data) == _raw_bytes(weight)
    assert weight.untyped_storage().resizable()
    weight.untyped_storage().resize_(0)


def _raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().untyped_storage())


# -- keyed before the passes (compiled_unet.compile, AOT) ---------------------------------------------------------

def test_compile_key_covers_the_passes_the_weights_and_the_callers_document(monkeypatch):
    from compiled_unet import passes as graph_passes

    ep, cfg, passes, doc = _program()[0], {"freezing": True}, list(graph_passes.DEFAULT_PASSES), {"config": {"a": 1}}
    key = package_cache.compile_key(ep, passes, cfg, doc)
    assert key is not None and key == package_cache.compile_key(_program()[0], passes, cfg, doc)  # deterministic
    assert key != package_cache.compile_key(ep, passes[:-1], cfg, doc)                # a pass left out
    assert key != package_cache.compile_key(ep, passes[::-1], cfg, doc)               # another order
    assert key != package_cache.compile_key(ep, None, cfg, doc)                       # no passes
    assert key != package_cache.compile_key(ep, passes, {"freezing": False}, doc)     # compile options
    assert key != package_cache.compile_key(ep, passes, cfg, {"config": {"a": 2}})    # the UNet's config
    changed = _program()[0]
    with torch.no_grad():
        changed.state_dict["conv.weight"][0, 0, 0, 0] += 1e-6  # one value of one weight
    assert key != package_cache.compile_key(changed, passes, cfg, doc)
    with monkeypatch.context() as m:  # the passes' or the library's source changed
        m.setattr(package_cache, "source_digest", lambda root: "another version")
        assert key != package_cache.compile_key(ep, passes, cfg, doc)
    assert key != package_cache.package_key(ep, cfg, doc)  # never the key of a program after its passes


def test_passes_the_key_cannot_name_are_not_keyed_before_running(monkeypatch):
    """A pass that is not one of the library's own functions has code the key does not cover: a changed user pass
    must not be answered with the package of the old one. Such compiles are keyed after their passes."""
    import functools

    from compiled_unet import export_cache, passes as graph_passes

    ep, cfg = _program()[0], {"freezing": True}

    def users_pass(gm, ctx):
        return 0

    for odd in (users_pass, lambda gm, ctx: 0, functools.partial(graph_passes.remove_noops)):
        assert package_cache.compile_key(ep, [graph_passes.remove_asserts, odd], cfg, {}) is None
    with monkeypatch.context() as m:  # a function of the library the passes call, replaced in this process
        m.setattr(sys.modules["compiled_unet.passes.fuse_qkv"], "fuse_qkv", users_pass)
        assert export_cache.process_refusal() is not None
        assert package_cache.compile_key(ep, [graph_passes.remove_asserts], cfg, {}) is None
    assert package_cache.compile_key(ep, [graph_passes.remove_asserts], cfg, {}) is not None


@pytest.mark.slow
def test_a_second_aot_compile_of_a_unet_skips_the_passes_and_the_lowering(monkeypatch, caplog):
    """The second compile of the same UNet (same weights, options) finds its package before running the passes:
    no pass runs (the pass runner logs each pass it runs) and nothing is lowered; the outputs are bitwise those
    of the first, which match eager (max-abs <= 1e-4 x scale); the report is the one the package recorded; a
    donating caller's weights are all freed (the package holds them). (That other weights are another package:
    test_compile_key_covers_the_passes_the_weights_and_the_callers_document.)
    No library function is patched here, not even the package folder (`package_folder`): a replaced one makes
    the key refuse, by design; so this uses the session's package cache, where the first compile may hit."""
    import logging

    import compiled_unet
    from cases import build, inputs_for
    from compiled_fixtures import assert_close_to_eager

    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    options = InductorOptions(aot=True)
    caplog.set_level(logging.INFO, logger="passes")
    first = compiled_unet.compile(build("sd"), sample, timestep, **kwargs, options=options)
    assert list(first.compile_stages) in (["export", "package cache", "passes", "lowering"],
                                          ["export", "package cache", "loading"])

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again instead of using the cached package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(torch._inductor, "aot_compile", refuse)
    caplog.clear()
    model, twin = build("sd"), build("sd")
    again = compiled_unet.compile(model, sample, timestep, **kwargs, options=options, donate_weights=True)
    assert list(again.compile_stages) == ["export", "package cache", "loading"]
    assert not [r.getMessage() for r in caplog.records if r.name == "passes"]
    assert again.report.rewrites == first.report.rewrites and again.report.rewrites["prepack_onednn"] > 0
    assert again.fused_qkv == first.fused_qkv and again.signature.to_json() == first.signature.to_json()
    left = [n for n, p in model.named_parameters() if p.untyped_storage().nbytes()]
    assert not left, left[:5]
    assert again.report.donated_bytes == sum(p.numel() * p.element_size() for p in twin.parameters())
    with torch.no_grad():
        out = again(sample, timestep, **kwargs).sample
        assert torch.equal(out, first(sample, timestep, **kwargs).sample)
        assert_close_to_eager(out, twin(sample, timestep, **kwargs).sample)
