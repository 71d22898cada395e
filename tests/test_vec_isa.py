"""backends/vec_isa.py: Inductor's SIMD probe recorded once per machine, so that a warm process starts no
child Python per ISA; and the ISA list Inductor then uses is exactly the one its probe gave."""
import json
import os
import platform
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the recorded probe applies to x86-64 Linux only")


@pytest.fixture
def fresh_cache(tmp_path):
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(tmp_path)):
        yield tmp_path


def _records(folder):
    sub = folder / "compiled_unet_vec_isa"
    return sorted(sub.iterdir()) if sub.exists() else []


def test_first_process_probes_and_records_later_ones_read(fresh_cache, monkeypatch):
    from torch._inductor import cpu_vec_isa

    from compiled_unet.backends.vec_isa import vec_isa_config

    probed = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]
    first = vec_isa_config()
    (record,) = _records(fresh_cache)
    doc = json.loads(record.read_text())
    assert doc["valid"] == probed and doc["all_valid"] == (doc["listed"] == probed)
    assert first == ({"cpp.vec_isa_ok": True} if doc["all_valid"] else {})

    def no_probe():
        raise AssertionError("probed again although the result is recorded")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", no_probe)
    assert vec_isa_config() == first


def test_trusting_the_flags_gives_the_probed_isa_list(fresh_cache):
    """What vec_isa_ok=True changes: Inductor's ISA list without the probe equals the probe's (when recorded
    as all valid); so kernels are built for the same ISA as in a probing process."""
    from torch._inductor import config, cpu_vec_isa

    from compiled_unet.backends.vec_isa import vec_isa_config

    if not vec_isa_config():
        pytest.skip("an ISA this CPU lists failed Inductor's probe here: nothing is trusted, nothing to compare")
    probed = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]
    with config.patch({"cpp.vec_isa_ok": True}):
        trusted = [str(i) for i in cpu_vec_isa.valid_vec_isa_list.__wrapped__()]
        picked = str(cpu_vec_isa.pick_vec_isa())
    assert trusted == probed and picked == str(cpu_vec_isa.pick_vec_isa())


def test_a_failed_isa_is_not_trusted(fresh_cache):
    from compiled_unet.backends.vec_isa import vec_isa_config

    vec_isa_config()
    (record,) = _records(fresh_cache)
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "valid": doc["listed"][1:], "all_valid": False}))
    assert vec_isa_config() == {}
    record.write_text("{not json")  # a damaged record: probed and written again
    vec_isa_config()
    assert json.loads(record.read_text())["listed"] == doc["listed"]


def test_a_user_choice_is_left_alone(fresh_cache):
    from torch._inductor import config

    from compiled_unet.backends.vec_isa import vec_isa_config

    with config.patch({"cpp.vec_isa_ok": False}):
        assert vec_isa_config() == {}
    with config.patch({"cpp.simdlen": 256}):
        assert vec_isa_config() == {}
    assert not _records(fresh_cache)


def test_the_background_probe_is_what_vec_isa_config_records(fresh_cache, monkeypatch):
    """`start_probe` (a compile's first step) runs Inductor's probe in a thread; `vec_isa_config` waits for it and
    records its answer; nothing starts when a record exists."""
    from torch._inductor import cpu_vec_isa

    from compiled_unet.backends import vec_isa

    monkeypatch.setattr(vec_isa, "_probe_thread", None)
    vec_isa.start_probe()
    thread = vec_isa._probe_thread
    assert thread is not None and thread.name == "compiled_unet-simd-probe"
    config = vec_isa.vec_isa_config()
    assert not thread.is_alive()                      # waited for
    (record,) = _records(fresh_cache)
    doc = json.loads(record.read_text())
    assert doc["valid"] == [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]
    assert config == ({"cpp.vec_isa_ok": True} if doc["all_valid"] else {})

    monkeypatch.setattr(vec_isa, "_probe_thread", None)
    vec_isa.start_probe()                             # recorded now: no thread
    assert vec_isa._probe_thread is None
