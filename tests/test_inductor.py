"""Inductor backend: compiled == eager, strict call signature, drop-in for a scheduler loop, the .pt2 round
trip in a fresh process, and weight swap without recompiling.

Compiled artifacts come from tests/compiled_fixtures.py (built once per process). Tolerance for fp32:
max-abs error <= 1e-4 x max(1, max |eager output|).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import compiled_unet
from cases import build
from closeness import assert_close
from compiled_fixtures import (assert_close_to_eager, bucket_example, bundle_dir, compiled_buckets,  # noqa: F401
                               compiled_jit, inductor_cache_files, swappable_aot, tiny_model)
from compiled_unet.backends import InductorOptions, cpu_kernels

pytestmark = pytest.mark.slow


def _eager(model, sample, timestep, **kwargs):
    with torch.no_grad():
        return model(sample, timestep, **kwargs).sample


# --------------------------------------------------------------------------------------------------
# Options: validated on construction, defaults per device in one place (cheap, no compile).

def test_options_validate():
    with pytest.raises(TypeError, match="freezing"):
        InductorOptions(freezing="yes")
    with pytest.raises(ValueError, match="channels_last"):
        InductorOptions(aot=True, channels_last=True)
    with pytest.raises(ValueError, match="cudagraphs"):
        InductorOptions(aot=True, cudagraphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        InductorOptions(cudagraphs=True).resolve(torch.device("cpu"))
    # float32 CPU jit: weights packed by the prepack_onednn pass, not frozen (the compiled graph then holds no
    # tensor and Inductor's caches apply); other dtypes freeze (the pass packs float32 only).
    cpu = InductorOptions().resolve(torch.device("cpu"))
    assert cpu.prepack_weights and not cpu.freezing and cpu.channels_last and not cpu.config()["freezing"]
    assert cpu.swap_refusal_reason() is None  # packed weights are graph inputs: swap_weights re-packs them
    bf16 = InductorOptions().resolve(torch.device("cpu"), torch.bfloat16)
    assert bf16.freezing and not bf16.prepack_weights
    frozen = InductorOptions(freezing=True).resolve(torch.device("cpu"))
    assert frozen.freezing and not frozen.prepack_weights
    swappable = InductorOptions(prepack_weights=False).resolve(torch.device("cpu"))
    assert not swappable.freezing and not swappable.prepack_weights and swappable.swap_refusal_reason() is None
    with pytest.raises(ValueError, match="choose one"):
        InductorOptions(freezing=True, prepack_weights=True)
    with pytest.raises(ValueError, match="jit-only"):
        InductorOptions(aot=True, prepack_weights=True)
    with pytest.raises(ValueError, match="float32"):
        InductorOptions(prepack_weights=True).resolve(torch.device("cpu"), torch.bfloat16)
    aot = InductorOptions(aot=True).resolve(torch.device("cpu"))
    assert aot.freezing and "aot_inductor.use_runtime_constant_folding" not in aot.config()  # CPU packages prepack
    unfrozen = InductorOptions(aot=True, freezing=False).resolve(torch.device("cpu"))
    assert unfrozen.config()["aot_inductor.use_runtime_constant_folding"]  # swapped weights reach folded constants
    assert InductorOptions(freezing=False).resolve(torch.device("cpu")).freezing is False  # explicit wins


def test_compile_rejects_bad_arguments(tiny_model):
    model, (sample, timestep), kwargs = tiny_model
    with pytest.raises(ValueError, match="unknown backend"):
        compiled_unet.compile(model, sample, timestep, backend="tvm", **kwargs)
    with pytest.raises(TypeError, match="InductorOptions"):
        compiled_unet.compile(model, sample, timestep, options={"freezing": True}, **kwargs)
    with pytest.raises(ValueError, match="passes"):
        compiled_unet.compile(model, sample, timestep, passes="fast", **kwargs)


# --------------------------------------------------------------------------------------------------
# In-process (jit) graph.

def test_jit_matches_eager(tiny_model, compiled_jit):
    model, (sample, timestep), kwargs = tiny_model
    ref = _eager(model, sample, timestep, **kwargs)
    out = compiled_jit(sample, timestep, **kwargs)
    assert isinstance(out, compiled_unet.UNet2DConditionOutput)
    assert_close_to_eager(out.sample, ref)
    (tup,) = compiled_jit(sample * 0.5, timestep, return_dict=False, **kwargs)
    assert_close_to_eager(tup, _eager(model, sample * 0.5, timestep, **kwargs))
    assert compiled_jit.report is not None and compiled_jit.report["fuse_qkv"] > 0  # the passes ran
    # compile() times its stages (compiled_unet/progress.py) whether or not a status line was drawn.
    assert list(compiled_jit.compile_stages) == ["export", "passes", "lowering"]
    assert all(seconds > 0 for seconds in compiled_jit.compile_stages.values())


def test_jit_never_recompiles(tiny_model, compiled_jit):
    from torch._dynamo.utils import counters

    model, (sample, timestep), kwargs = tiny_model
    before = dict(counters["stats"])
    files = inductor_cache_files()
    for scale in (0.1, 2.0, -1.0):
        compiled_jit(sample * scale, timestep + 3, encoder_hidden_states=kwargs["encoder_hidden_states"] * scale)
    assert dict(counters["stats"]) == before
    assert inductor_cache_files() == files


def test_wrong_inputs_raise_naming_expected_shapes(tiny_model, compiled_jit):
    model, (sample, timestep), kwargs = tiny_model
    ehs = kwargs["encoder_hidden_states"]
    with pytest.raises(ValueError, match=r"sample is \[1, 4, 8, 8\].*expected \[2, 4, 8, 8\]"):
        compiled_jit(sample[:1], timestep[:1], ehs[:1])
    with pytest.raises(ValueError, match=r"expects exactly: sample: \[2, 4, 8, 8\] float32"):
        compiled_jit(torch.randn(2, 4, 16, 16), timestep, ehs)
    with pytest.raises(ValueError, match="float64"):
        compiled_jit(sample.double(), timestep, ehs)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        compiled_jit(sample, timestep, ehs[:, :3])
    with pytest.raises(ValueError, match="missing"):
        compiled_jit(sample, timestep)
    with pytest.raises(ValueError, match=r"compiled without \['class_labels'\]"):
        compiled_jit(sample, timestep, ehs, class_labels=torch.tensor([1, 2]))


def test_pipeline_attributes(tiny_model, compiled_jit):
    model = tiny_model[0]
    c = compiled_jit
    for key in ("in_channels", "out_channels", "sample_size", "time_cond_proj_dim", "addition_embed_type",
                "cross_attention_dim", "block_out_channels"):
        assert getattr(c.config, key) == getattr(model.config, key)
        assert c.config[key] == c.config.get(key)
    assert c.dtype == torch.float32 and c.device == torch.device("cpu") and c.in_channels == 4
    assert c.to("cpu") is c and c.eval() is c


def test_ddim_scheduler_loop(tiny_model, compiled_jit):
    """The compiled graph as `pipe.unet` in a 3-step DDIM loop: 0-d int64 timesteps as pipelines pass them."""
    diffusers = pytest.importorskip("diffusers")
    model, (sample, _), kwargs = tiny_model
    latents = {}
    for name, unet in (("eager", model), ("compiled", compiled_jit)):
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(3)
        x = sample.clone()
        for t in scheduler.timesteps:
            with torch.no_grad():
                x_in = scheduler.scale_model_input(x, t)
                eps = unet(x_in, t, encoder_hidden_states=kwargs["encoder_hidden_states"]).sample
            x = scheduler.step(eps, t, x).prev_sample
        latents[name] = x
    assert_close_to_eager(latents["compiled"], latents["eager"])


def test_config_from_diffusers_unet(tiny_model):
    """diffusers' FrozenDict config becomes the same `.config` as ours (no compile)."""
    diffusers = pytest.importorskip("diffusers")
    from compiled_unet.runtime.compiled import config_from_dict, config_to_dict

    model = tiny_model[0]
    theirs = diffusers.UNet2DConditionModel(**model.config.to_dict())
    assert config_from_dict(config_to_dict(theirs.config)) == model.config


# --------------------------------------------------------------------------------------------------
# AOTInductor: bucket 0 of the shared bundle is a plain AOT-compiled UNet.

def test_aot_matches_eager(tiny_model, compiled_buckets):
    model = tiny_model[0]
    aot = compiled_buckets.buckets[0]
    ex = bucket_example(0)
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    assert_close_to_eager(aot(sample, timestep, **ex).sample, _eager(model, sample, timestep, **ex))


def test_aot_compile_keeps_no_frozen_weights_alive(compiled_buckets):
    """torch keeps the frozen graph modules of the latest AOT compile alive, with every packed weight (SD1.5:
    3.44 GB for the rest of the process, on top of which the package's own load peaked at 4.2x the weights);
    the compile releases them once the package is written. Without that step two such graphs remain here."""
    gc.collect()
    holding = [o for o in gc.get_objects() if issubclass(type(o), torch.fx.GraphModule)
               and any(k.startswith("_frozen_param") for k in o._buffers)]
    assert holding == []  # and the packages still match eager: test_aot_matches_eager, which runs after the drop


def test_aot_package_written_from_a_file_mapping_is_torchs_archive(tmp_path, monkeypatch):
    """`_compile_and_package` writes the compiled files into the archive from file mappings (torch's writer reads
    each file whole and copies it again: SD1.5 +2x the weights); the archive must hold the same members as
    torch's `aoti_compile_and_package` of the same program, and load through torch's loader to the same output."""
    from cases import ConvLinear
    from compiled_unet.backends import inductor

    torch.manual_seed(0)
    model, x = ConvLinear().eval(), torch.randn(1, 8, 8, 8)
    ep = torch.export.export(model, (x,))
    cfg = inductor._compile_config(InductorOptions(aot=True).resolve(torch.device("cpu")), ep)
    monkeypatch.setattr(inductor, "_MAPPED_WRITE_BYTES", 0)  # every file through the mapping, however small
    mapped, from_file = [], torch.UntypedStorage.from_file
    monkeypatch.setattr(torch.UntypedStorage, "from_file",
                        staticmethod(lambda f, *a, **k: (mapped.append(os.path.basename(f)), from_file(f, *a, **k))[1]))
    ours = inductor._compile_and_package(ep, str(tmp_path / "ours.pt2"), dict(cfg))
    assert any(name.endswith(".so") for name in mapped), mapped
    with torch.no_grad():
        theirs = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "theirs.pt2"),
                                                          inductor_configs=dict(cfg))
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.testzip() is None
        members = [sorted(n.split("/", 1)[1] for n in z.namelist()) for z in (a, b)]  # under "ours/", "theirs/"
        assert members[0] == members[1]
    out_ours, out_theirs = (torch._inductor.aoti_load_package(p)(x) for p in (ours, theirs))
    assert torch.equal(out_ours[0], out_theirs[0])
    with torch.no_grad():
        assert_close(out_ours[0], model(x)[0])


def test_save_is_atomic_and_carries_signature(tmp_path, compiled_buckets):
    path = compiled_unet.save(compiled_buckets.buckets[0], tmp_path / "unet.pt2")
    assert os.listdir(tmp_path) == ["unet.pt2"]  # no temporary left behind
    loaded = compiled_unet.load(path)
    assert loaded.signature == compiled_buckets.buckets[0].signature
    assert loaded.config == compiled_buckets.buckets[0].config
    with pytest.raises(FileNotFoundError):
        compiled_unet.load(tmp_path / "missing.pt2")


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import compiled_unet
    from compiled_unet import unet as unet_module

    def refuse(*a, **k):
        raise AssertionError("the model was built")
    unet_module.UNet2DConditionModel.__init__ = refuse

    pt2, inputs_path, out_path = sys.argv[1:]
    loaded = compiled_unet.load(pt2)
    inp = torch.load(inputs_path)
    out = loaded(inp.pop("sample"), inp.pop("timestep"), **inp)
    assert isinstance(out, compiled_unet.UNet2DConditionOutput)
    torch.save(out.sample, out_path)
    banned = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "cases", "passes"))
    print(json.dumps({"banned": banned, "in_channels": loaded.config.in_channels}))
""")


def test_pt2_round_trip_in_fresh_process(tmp_path, tiny_model, bundle_dir):
    """load() in a process that imports only torch and compiled_unet and never builds the model."""
    model = tiny_model[0]
    ex = bucket_example(0)
    torch.save(ex, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(bundle_dir, "bucket_0.pt2"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"banned": [], "in_channels": 4}
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    assert_close_to_eager(torch.load(tmp_path / "out.pt"), _eager(model, sample, timestep, **ex))


def test_weight_swap_without_recompile(swappable_aot, tmp_path):
    """New weights (a re-randomized state dict) into a loaded unfrozen package: the new model's outputs, same
    loaded object, no new files in Inductor's cache. Saving it afterwards is refused: the package file holds the
    weights it was compiled with, so a copy would load as a different model than the one saved."""
    compiled, path = swappable_aot
    ex = bucket_example(0)
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    new_model = build("sd", seed=7)
    derived = compiled.derive_weights(new_model.state_dict())  # passes only, no compile
    loaded = compiled_unet.load(path)
    runner, files = loaded._runner.model, inductor_cache_files()
    before = loaded(sample, timestep, **ex).sample.clone()
    with pytest.raises(ValueError, match="derive_weights"):
        loaded.swap_weights(new_model.state_dict())  # original names need the exported program
    loaded.swap_weights(derived)
    after = loaded(sample, timestep, **ex).sample
    assert_close_to_eager(after, _eager(new_model, sample, timestep, **ex))
    assert (after - before).abs().max() > 1e-2  # the weights really changed
    assert loaded._runner.model is runner and inductor_cache_files() == files
    with pytest.raises(RuntimeError, match="swap_weights"):
        compiled_unet.save(loaded, tmp_path / "swapped.pt2")
    assert not os.listdir(tmp_path)  # nothing written, not even a temporary


def test_a_saved_package_records_what_the_passes_did(swappable_aot, tmp_path):
    """A package's document records the pass report (rewrites, node and op counts: what `inspect` and a user read
    of a shipped artifact; no timings), and a load gives it back; a damaged record is a DamagedArtifact naming the
    file, not a stack trace."""
    from compiled_unet.backends.inductor import _rewrite_package_doc, read_package_doc
    from compiled_unet.errors import DamagedArtifact

    compiled, path = swappable_aot
    loaded = compiled_unet.load(path)
    assert loaded.report.rewrites == compiled.report.rewrites and loaded.report.rewrites["fuse_qkv"] > 0
    assert loaded.report.ops_after == compiled.report.ops_after
    assert loaded.report.table() == compiled.report.table()
    damaged = str(tmp_path / "damaged.pt2")
    _rewrite_package_doc(path, damaged, {**read_package_doc(path), "passes": {"stats": "?"}})
    with pytest.raises(DamagedArtifact, match="damaged.pt2.*pass report"):
        compiled_unet.load(damaged)


def test_two_loads_of_one_package_keep_their_own_weights(swappable_aot):
    """Both loads run the one cached library (dlopened once per process); a swap into one must not reach the
    other: each holds its own constants (outputs vs eager <= 1e-4 x scale; the untouched one bitwise unchanged)."""
    compiled, path = swappable_aot
    ex = bucket_example(0)
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    first, second = compiled_unet.load(path), compiled_unet.load(path)
    assert first._runner.model.library == second._runner.model.library
    before = second(sample, timestep, **ex).sample.clone()
    new_model = build("sd", seed=11)
    first.swap_weights(compiled.derive_weights(new_model.state_dict()))
    assert_close_to_eager(first(sample, timestep, **ex).sample, _eager(new_model, sample, timestep, **ex))
    assert torch.equal(second(sample, timestep, **ex).sample, before)


def test_weight_swap_with_model_state_dict_in_process(tiny_model, swappable_aot):
    """In the compiling process, swap_weights takes the UNet's own state_dict (derived through the passes);
    the shared package gets its original weights back afterwards."""
    model = tiny_model[0]
    aot = swappable_aot[0]
    ex = bucket_example(0)
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    new_model = build("sd", seed=8)
    try:
        aot.swap_weights(new_model.state_dict())
        assert_close_to_eager(aot(sample, timestep, **ex).sample, _eager(new_model, sample, timestep, **ex))
    finally:
        aot.swap_weights(model.state_dict())
    assert_close_to_eager(aot(sample, timestep, **ex).sample, _eager(model, sample, timestep, **ex))
    with pytest.raises(ValueError, match="strict"):
        aot.swap_weights({"conv_in.weight": model.conv_in.weight.detach()})
    loaded = compiled_unet.load(swappable_aot[1])
    with pytest.raises(RuntimeError, match="exported program"):
        loaded.derive_weights(model.state_dict())


def test_frozen_graphs_refuse_weight_swap(tiny_model, compiled_buckets, bundle_dir):
    """Frozen packages (the CPU AOT default) hold their weights as prepacked constants under internal names:
    swap_weights and derive_weights say so instead of loading a part of the weights silently."""
    state = build("sd", seed=8).state_dict()
    loaded = compiled_unet.load(os.path.join(bundle_dir, "bucket_1.pt2"))
    for frozen in (compiled_buckets.buckets[1], loaded, compiled_buckets):
        with pytest.raises(RuntimeError, match="frozen"):
            frozen.swap_weights(state)
    with pytest.raises(RuntimeError, match="frozen"):
        compiled_buckets.buckets[1].derive_weights(state)
    assert loaded.options.freezing and compiled_buckets.buckets[1].options.freezing


def test_jit_default_swaps_packed_weights_without_touching_the_model(tiny_model):
    """The CPU jit default runs on weights packed in the graph (prepack_onednn) that are inputs of the compiled
    code: swap_weights re-runs the passes on the new weights, packs them, and hands the graph new tensors.
    Compiled vs the new weights' eager: max-abs <= 1e-4 x scale. The model it was compiled from keeps its own
    weights (export shares them with the graph; a swap must not write into them)."""
    model, (sample, timestep), kwargs = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs)  # the fixture's graph: a cache hit
    assert compiled.options.prepack_weights and compiled._runner.packed_weight_names()
    other = build("sd", seed=8)
    compiled.swap_weights(other.state_dict())
    assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, _eager(other, sample, timestep, **kwargs))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "swap wrote into the model"
    derived = compiled.derive_weights(model.state_dict())
    name = sorted(compiled._runner.packed_weight_names())[0]
    with pytest.raises(ValueError, match="oneDNN-packed"):
        compiled.swap_weights({**derived, name: derived[name].to_dense()})
    compiled.swap_weights(derived)  # back, through the graph's own names
    assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, _eager(model, sample, timestep, **kwargs))


# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_jit_and_aot_match_eager():
    model = build("sd").cuda()
    ex = {k: v.cuda() if torch.is_tensor(v) else v for k, v in bucket_example(0).items()}
    sample, timestep = ex.pop("sample"), ex.pop("timestep")
    ref = _eager(model, sample, timestep, **ex)
    for options in (InductorOptions(), InductorOptions(aot=True)):
        c = compiled_unet.compile(model, sample, timestep, options=options, **ex)
        assert c.device.type == "cuda"
        assert_close_to_eager(c(sample, timestep, **ex).sample, ref)


def test_scalar_timestep_binds_to_a_dense_tensor_for_batch_one():
    """Regression: a 0-d timestep expanded to batch 1 kept stride 0 through .contiguous(), and dynamo's
    stride guard then refused the call as a recompile (seen in examples/scheduler_loop.py)."""
    from compiled_unet.runtime import Signature
    sample = torch.randn(1, 4, 8, 8)
    sig = Signature.from_call((sample, torch.tensor([999.0])), {"encoder_hidden_states": torch.randn(1, 5, 8)})
    args, _ = sig.bind(sample, torch.tensor(981), encoder_hidden_states=torch.randn(1, 5, 8))
    assert args[1].shape == (1,) and args[1].stride() == (1,) and args[1].dtype == torch.float32
    assert args[1].item() == 981.0


def test_cpu_default_passes_route_linears_to_the_kernel_measured_faster(compiled_jit):
    """On CPU, compile's default pass list sends the transformer linears to the linear kernel this machine
    measured faster (backends/cpu_kernels.py): oneDNN 1x1 convolutions or MKL's packed GEMM; the other pass
    does not run. (Each kernel on its own: tests/test_linear_kernel.py.)"""
    kernel = compiled_jit._runner.options.linear_kernel
    assert kernel == cpu_kernels.faster_linear_kernel()
    chosen, other = ("prepack_mkl_linear", "linear_to_conv1x1") if kernel == "mkl" else \
        ("linear_to_conv1x1", "prepack_mkl_linear")
    assert compiled_jit.report.rewrites[chosen] > 0 and other not in compiled_jit.report.rewrites


def test_weights_lifted_from_the_program_as_the_unlift_would(compiled_jit, monkeypatch):
    """JitRunner takes the program's graph with its weights as leading inputs (backends/inductor.py
    `_weights_as_inputs`) instead of unlifting them into attributes and lifting them back: the same weights,
    the same tensors, and the same outputs, bit for bit (the same ops in eager). Its Python code is made when
    first needed, not with the module (Inductor reads the graph)."""
    import torch.utils._pytree as pytree

    from compiled_unet.backends.inductor import _flat_module, _lift_weights, _weights_as_inputs

    ep = compiled_jit._optimized
    made, real = [], torch.fx.Graph.python_code
    with monkeypatch.context() as m:
        m.setattr(torch.fx.Graph, "python_code", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
        module, weights = _weights_as_inputs(ep)
        module.recompile()
    assert made == []
    unlifted, in_spec, out_spec = _flat_module(ep)
    lifted_back = _lift_weights(unlifted)
    assert weights.keys() == lifted_back.keys() and all(weights[k] is lifted_back[k] for k in weights)
    assert in_spec == ep.call_spec.in_spec and out_spec == ep.call_spec.out_spec
    flat = pytree.tree_flatten(ep.example_inputs)[0]
    with torch.no_grad():
        ours = module(*weights.values(), *flat)
        theirs = unlifted(*lifted_back.values(), *flat)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_jit_graph_takes_no_constant_inputs(compiled_jit):
    """`return_dict` is a bool placeholder of the exported program; Inductor before 2.13 refuses a bool graph
    input (seen on the GPU machine's torch 2.11: "Unsupported inductor graph input type: BooleanFalse"). The jit
    graph drops it and every call leaves it out: only tensors reach the compiled code."""
    runner = compiled_jit._runner
    vals = [n.meta.get("val") for n in runner.module.graph.find_nodes(op="placeholder")]
    user = vals[len(runner.weights):]
    assert all(isinstance(v, torch.Tensor) for v in user), [type(v).__name__ for v in user]
    assert runner._user_leaf_kept.count(False) == 1  # return_dict


def test_dropping_constant_inputs_keeps_read_ones():
    from compiled_unet.backends.inductor import _drop_unused_constant_inputs

    g = torch.fx.Graph()
    x, flag, scale, w = (g.placeholder(n) for n in ("x", "flag", "scale", "w"))
    x.meta["val"], flag.meta["val"], scale.meta["val"] = torch.ones(2), False, 2.0  # w: no example value
    g.output(g.call_function(torch.mul, (x, scale)))
    module = torch.fx.GraphModule(torch.nn.Module(), g)
    assert _drop_unused_constant_inputs(module) == [True, False, True, True]  # a read constant and w stay
    assert torch.equal(module(torch.ones(2), 3.0, None), torch.full((2,), 3.0))


def test_buffer_writes_behave_as_in_the_unlifted_module():
    """A functional program returns its buffer writes as outputs: the unlift applies them, so the direct path
    declines (None). A program that writes a buffer in place keeps the write in its graph: the weights-as-inputs
    module then updates the same tensor, call after call, as the unlifted module does."""
    from compiled_unet.backends.inductor import _weights_as_inputs

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * self.calls

    x = torch.ones(3)
    assert _weights_as_inputs(torch.export.export(Counter(), (x,)).run_decompositions()) is None
    direct, weights = _weights_as_inputs(torch.export.export(Counter(), (x,)))
    unlifted = torch.export.export(Counter(), (x,)).module()
    for _ in range(2):
        assert torch.equal(direct(*weights.values(), x)[0], unlifted(x))
    assert weights["calls"].item() == unlifted.calls.item() == 2
    plain = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    module, weights = _weights_as_inputs(plain)
    assert list(weights) == ["weight", "bias"]
