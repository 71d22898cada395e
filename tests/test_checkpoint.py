"""Checkpoint I/O against diffusers 0.42.1's own save_pretrained/from_pretrained, on a tiny UNet.

Round trips run for every model class in MODEL_KINDS; our class joins automatically once
`compiled_unet.UNet2DConditionModel` is importable (it is skipped until then).
"""
import copy
import json
import os
import tempfile

import diffusers
import pytest
import safetensors
import safetensors.torch
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hypothesis import given
from hypothesis import strategies as st

from compiled_unet import checkpoint
from compiled_unet.checkpoint import (
    CheckpointError,
    load_pretrained_files,
    load_state_dict_strict,
    parse_size,
    save_pretrained,
)

TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8,
)
# The tiny UNet holds ~205 KB of fp32 weights: 40KB shards give several files in both fp32 and fp16.
SMALL_SHARD = "40KB"
MODEL_KINDS = ["diffusers", "compiled_unet"]


def model_class(kind):
    if kind == "diffusers":
        return diffusers.UNet2DConditionModel
    from compiled_unet import UNet2DConditionModel

    return UNet2DConditionModel


@pytest.fixture(params=MODEL_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    torch.manual_seed(0)
    return model_class(kind)(**TINY)


@pytest.fixture(scope="module")
def reference():
    """A diffusers UNet with seeded weights, never modified by tests."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY)


@pytest.fixture(scope="module")
def config(reference):
    """The full config diffusers records for TINY, as the model class will pass it to save_pretrained."""
    return dict(reference.config)


def as_diffusers(model):
    """A diffusers UNet holding `model`'s weights (our class shares diffusers' state-dict keys)."""
    twin = diffusers.UNet2DConditionModel(**TINY).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def assert_same_tensors(expected, actual):
    assert list(sorted(expected)) == list(sorted(actual))
    for key in expected:
        assert expected[key].dtype == actual[key].dtype, key
        assert torch.equal(expected[key].cpu(), actual[key].cpu()), key


def json_normalized(config):
    """Config as it reads back from JSON (tuples become lists), without bookkeeping keys."""
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    return json.loads(json.dumps(public))


def read_text(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def folder_files(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------
# Our save -> diffusers' from_pretrained


def test_our_single_file_save_loads_in_diffusers(model, config, tmp_path):
    save_pretrained(model, tmp_path / "ours", config=config)
    assert folder_files(tmp_path / "ours") == ["config.json", "diffusion_pytorch_model.safetensors"]

    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    assert json_normalized(dict(loaded.config)) == json_normalized(config)
    assert_same_tensors(model.state_dict(), loaded.state_dict())

    with safetensors.safe_open(tmp_path / "ours" / "diffusion_pytorch_model.safetensors", "pt") as file:
        assert file.metadata() == {"format": "pt"}


def test_config_json_is_byte_identical_to_diffusers(reference, config, tmp_path):
    reference.save_pretrained(tmp_path / "theirs")
    save_pretrained(reference, tmp_path / "ours", config=config)
    ours = read_text(tmp_path / "ours" / "config.json")
    assert ours == read_text(tmp_path / "theirs" / "config.json")
    assert json.loads(ours)["_class_name"] == "UNet2DConditionModel"
    assert json.loads(ours)["_diffusers_version"] == "0.42.1"


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_our_sharded_save_matches_diffusers_and_loads_in_it(model, config, variant, tmp_path):
    if variant == "fp16":
        model = model.half()
    save_pretrained(model, tmp_path / "ours", config=config, variant=variant, max_shard_size=SMALL_SHARD)
    as_diffusers(model).save_pretrained(tmp_path / "theirs", variant=variant, max_shard_size=SMALL_SHARD)

    # Same file names, and an index that is byte for byte diffusers' (weight_map and total_size).
    assert folder_files(tmp_path / "ours") == folder_files(tmp_path / "theirs")
    index_name = "diffusion_pytorch_model.safetensors.index.json"
    if variant == "fp16":
        index_name = "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert read_text(tmp_path / "ours" / index_name) == read_text(tmp_path / "theirs" / index_name)

    loaded = diffusers.UNet2DConditionModel.from_pretrained(
        tmp_path / "ours", variant=variant, torch_dtype=next(model.parameters()).dtype
    )
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_variant_file_names(reference, config, tmp_path):
    half = copy.deepcopy(reference).half()
    save_pretrained(half, tmp_path / "one", config=config, variant="fp16")
    assert folder_files(tmp_path / "one") == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]

    save_pretrained(half, tmp_path / "many", config=config, variant="fp16", max_shard_size="60KB")
    assert folder_files(tmp_path / "many") == [
        "config.json",
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
    ]


def test_pickle_save_loads_in_diffusers_and_back(model, config, tmp_path):
    save_pretrained(model, tmp_path, config=config, safe_serialization=False)
    assert folder_files(tmp_path) == ["config.json", "diffusion_pytorch_model.bin"]
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    _, state_dict = load_pretrained_files(tmp_path, allow_pickle=True)
    assert_same_tensors(model.state_dict(), state_dict)


def test_sharded_pickle_save_matches_diffusers(reference, config, tmp_path):
    save_pretrained(
        reference, tmp_path / "ours", config=config, safe_serialization=False,
        variant="fp16", max_shard_size=SMALL_SHARD,
    )
    reference.save_pretrained(
        tmp_path / "theirs", safe_serialization=False, variant="fp16", max_shard_size=SMALL_SHARD
    )
    assert folder_files(tmp_path / "ours") == folder_files(tmp_path / "theirs")
    assert "diffusion_pytorch_model.bin.index.fp16.json" in folder_files(tmp_path / "ours")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_pretrained_files(tmp_path / "ours", variant="fp16")
    _, state_dict = load_pretrained_files(tmp_path / "theirs", variant="fp16", allow_pickle=True)
    assert_same_tensors(reference.state_dict(), state_dict)


# ----------------------------------------------------------------------------------------------
# diffusers' save_pretrained -> load_pretrained_files -> load_state_dict_strict

DIFFUSERS_SAVES = {
    "single": dict(),
    "sharded": dict(max_shard_size=SMALL_SHARD),
    "fp16": dict(variant="fp16"),
    "fp16-sharded": dict(variant="fp16", max_shard_size=SMALL_SHARD),
}


@pytest.mark.parametrize("save_kwargs", DIFFUSERS_SAVES.values(), ids=DIFFUSERS_SAVES.keys())
def test_diffusers_save_reads_back_equal(save_kwargs, tmp_path):
    torch.manual_seed(1)
    source = diffusers.UNet2DConditionModel(**TINY)
    if save_kwargs.get("variant") == "fp16":
        source = source.half()
    source.save_pretrained(tmp_path, **save_kwargs)

    config, state_dict = load_pretrained_files(tmp_path, variant=save_kwargs.get("variant"))
    assert config == json.loads(read_text(tmp_path / "config.json"))
    assert config["_class_name"] == "UNet2DConditionModel"
    assert_same_tensors(source.state_dict(), state_dict)


def test_diffusers_save_loads_into_model(kind, reference, tmp_path):
    reference.save_pretrained(tmp_path / "unet")
    _, state_dict = load_pretrained_files(tmp_path, subfolder="unet")
    target = model_class(kind)(**TINY)
    load_state_dict_strict(target, state_dict)
    assert_same_tensors(reference.state_dict(), target.state_dict())


def test_meta_model_adopts_weights_with_torch_dtype(kind, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    _, state_dict = load_pretrained_files(tmp_path)
    with torch.device("meta"):
        target = model_class(kind)(**TINY)
    load_state_dict_strict(target, state_dict, dtype=torch.float16)

    loaded = target.state_dict()
    assert all(tensor.device.type == "cpu" for tensor in loaded.values())
    assert {tensor.dtype for tensor in loaded.values()} == {torch.float16}
    assert_same_tensors({key: t.half() for key, t in reference.state_dict().items()}, loaded)


def test_meta_model_keeps_its_own_dtype_without_torch_dtype(reference):
    half_state = {key: tensor.half() for key, tensor in reference.state_dict().items()}
    with torch.device("meta"):
        target = diffusers.UNet2DConditionModel(**TINY)
    load_state_dict_strict(target, half_state)
    assert {tensor.dtype for tensor in target.state_dict().values()} == {torch.float32}


def test_materialized_model_is_cast_to_torch_dtype(reference):
    target = diffusers.UNet2DConditionModel(**TINY)
    load_state_dict_strict(target, reference.state_dict(), dtype=torch.bfloat16)
    expected = {key: tensor.bfloat16() for key, tensor in reference.state_dict().items()}
    assert_same_tensors(expected, target.state_dict())


# ----------------------------------------------------------------------------------------------
# Strict loading errors


def test_strict_error_names_every_missing_unexpected_and_mismatched_key(reference):
    state_dict = dict(reference.state_dict())
    del state_dict["conv_in.weight"]
    del state_dict["time_embedding.linear_1.bias"]
    state_dict["not.a.weight"] = torch.zeros(1)
    state_dict["extra.bias"] = torch.zeros(1)
    state_dict["conv_out.bias"] = torch.zeros(5)
    before = {key: tensor.clone() for key, tensor in reference.state_dict().items()}

    with pytest.raises(CheckpointError) as excinfo:
        load_state_dict_strict(reference, state_dict)
    message = str(excinfo.value)
    assert "missing keys (2)" in message
    assert "conv_in.weight" in message and "time_embedding.linear_1.bias" in message
    assert "unexpected keys (2)" in message
    assert "not.a.weight" in message and "extra.bias" in message
    assert "conv_out.bias: expected (4,), got (5,)" in message
    # Nothing was copied before the check failed.
    assert_same_tensors(before, reference.state_dict())


def test_not_strict_ignores_key_differences_but_not_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    partial = {"0.weight": torch.ones(3, 2), "surplus": torch.zeros(1)}
    load_state_dict_strict(model, partial, strict=False)
    assert torch.equal(model[0].weight, torch.ones(3, 2))

    with pytest.raises(CheckpointError, match=r"0\.bias: expected \(3,\), got \(2,\)"):
        load_state_dict_strict(model, {"0.bias": torch.zeros(2)}, strict=False)


def test_meta_model_refuses_to_leave_weights_without_data():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match="lacks \\['bias'\\]"):
        load_state_dict_strict(model, {"weight": torch.ones(3, 2)}, strict=False)


def test_bad_dtype_is_refused():
    with pytest.raises(CheckpointError, match="dtype"):
        load_state_dict_strict(torch.nn.Linear(1, 1), {}, dtype=torch.int8)


# ----------------------------------------------------------------------------------------------
# load_pretrained_files errors: each names the path and what was expected


@pytest.fixture
def saved(reference, config, tmp_path):
    """A good single-file checkpoint in tmp_path / "model"."""
    folder = tmp_path / "model"
    save_pretrained(reference, folder, config=config)
    return folder


@pytest.fixture
def saved_sharded(reference, config, tmp_path):
    folder = tmp_path / "sharded"
    save_pretrained(reference, folder, config=config, max_shard_size=SMALL_SHARD)
    return folder


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as excinfo:
        load_pretrained_files(path)
    assert str(path) in str(excinfo.value)


def test_missing_subfolder(saved):
    with pytest.raises(CheckpointError, match="subfolder 'unet'") as excinfo:
        load_pretrained_files(saved, subfolder="unet")
    assert str(saved) in str(excinfo.value)


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(CheckpointError, match="has no config.json") as excinfo:
        load_pretrained_files(saved)
    assert str(saved) in str(excinfo.value)


@pytest.mark.parametrize("text, expected", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_invalid_config(saved, text, expected):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=expected) as excinfo:
        load_pretrained_files(saved)
    assert str(saved / "config.json") in str(excinfo.value)


def test_corrupt_safetensors(saved):
    weights = saved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 3 + b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="cannot read safetensors file") as excinfo:
        load_pretrained_files(saved)
    assert str(weights) in str(excinfo.value)


def test_truncated_safetensors(saved):
    weights = saved / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as excinfo:
        load_pretrained_files(saved)
    assert str(weights) in str(excinfo.value)


def test_git_lfs_pointer_gets_a_hint(saved):
    weights = saved / "diffusion_pytorch_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(CheckpointError, match="git lfs pull"):
        load_pretrained_files(saved)


def test_missing_shard(saved_sharded):
    shard = "diffusion_pytorch_model-00002-of-00006.safetensors"
    os.remove(saved_sharded / shard)
    with pytest.raises(CheckpointError, match=f"shard '{shard}'") as excinfo:
        load_pretrained_files(saved_sharded)
    assert "diffusion_pytorch_model.safetensors.index.json" in str(excinfo.value)


def test_index_naming_a_tensor_its_shard_lacks(saved_sharded):
    index_path = saved_sharded / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "diffusion_pytorch_model-00001-of-00006.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        load_pretrained_files(saved_sharded)


@pytest.mark.parametrize("bad_name", ["../escape.safetensors", "/etc/passwd"])
def test_index_cannot_point_outside_the_folder(saved_sharded, bad_name):
    index_path = saved_sharded / "diffusion_pytorch_model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": {"conv_in.weight": bad_name}}))
    with pytest.raises(CheckpointError, match="not a file name"):
        load_pretrained_files(saved_sharded)


def test_invalid_index(saved_sharded):
    (saved_sharded / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        load_pretrained_files(saved_sharded)


def test_missing_variant_lists_the_files_present(saved):
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained_files(saved, variant="fp16")
    message = str(excinfo.value)
    assert "variant 'fp16'" in message and str(saved) in message
    assert "diffusion_pytorch_model.fp16.safetensors" in message  # what was expected
    assert "files present: ['config.json', 'diffusion_pytorch_model.safetensors']" in message


def test_folder_without_weights(saved):
    os.remove(saved / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"no weights in .*files present: \['config.json'\]"):
        load_pretrained_files(saved)


def test_pickle_refused_without_opt_in_and_loaded_with_it(reference, tmp_path):
    reference.save_pretrained(tmp_path, safe_serialization=False, variant="fp16")
    with pytest.raises(CheckpointError, match="allow_pickle=True") as excinfo:
        load_pretrained_files(tmp_path, variant="fp16")
    assert str(tmp_path / "diffusion_pytorch_model.fp16.bin") in str(excinfo.value)

    _, state_dict = load_pretrained_files(tmp_path, variant="fp16", allow_pickle=True)
    assert_same_tensors(reference.state_dict(), state_dict)


class NotATensor:
    pass


def test_pickle_with_arbitrary_objects_is_refused_even_when_allowed(saved):
    os.remove(saved / "diffusion_pytorch_model.safetensors")
    torch.save({"w": NotATensor()}, saved / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True") as excinfo:
        load_pretrained_files(saved, allow_pickle=True)
    assert "diffusion_pytorch_model.bin" in str(excinfo.value)


def test_corrupt_pickle(saved):
    os.remove(saved / "diffusion_pytorch_model.safetensors")
    (saved / "diffusion_pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read pickle checkpoint"):
        load_pretrained_files(saved, allow_pickle=True)


# ----------------------------------------------------------------------------------------------
# Saving: atomicity, stale files, tied tensors, arguments


class PartialWriteFailure(RuntimeError):
    pass


def failing_save_file(fail_on_call):
    """A safetensors save_file that writes half a file on call number `fail_on_call`, then raises."""
    real_save_file = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        real_save_file(tensors, filename, metadata=metadata)
        if len(calls) == fail_on_call:
            with open(filename, "r+b") as file:
                file.truncate(os.path.getsize(filename) // 2)
            raise PartialWriteFailure("disk full")

    return save_file


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


@pytest.mark.parametrize(
    "shard_size, fail_on_call", [("10GB", 1), (SMALL_SHARD, 2)], ids=["single", "sharded"]
)
def test_failed_save_keeps_the_previous_checkpoint(
    reference, config, tmp_path, monkeypatch, shard_size, fail_on_call
):
    folder = tmp_path / "model"
    save_pretrained(reference, folder, config=config, max_shard_size=shard_size)
    before = snapshot(folder)

    torch.manual_seed(2)
    other = diffusers.UNet2DConditionModel(**TINY)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file(fail_on_call))
    with pytest.raises(PartialWriteFailure):
        save_pretrained(other, folder, config=config, max_shard_size=shard_size)
    monkeypatch.undo()

    assert snapshot(folder) == before  # no temp file, no half-written file, nothing replaced
    _, state_dict = load_pretrained_files(folder)
    assert_same_tensors(reference.state_dict(), state_dict)


def test_saving_replaces_stale_shards_and_index(reference, config, tmp_path):
    save_pretrained(reference, tmp_path, config=config, max_shard_size=SMALL_SHARD)
    save_pretrained(reference, tmp_path, config=config)
    assert folder_files(tmp_path) == ["config.json", "diffusion_pytorch_model.safetensors"]

    save_pretrained(reference, tmp_path, config=config, max_shard_size="60KB")
    assert folder_files(tmp_path) == [
        "config.json",
        "diffusion_pytorch_model-00001-of-00004.safetensors",
        "diffusion_pytorch_model-00002-of-00004.safetensors",
        "diffusion_pytorch_model-00003-of-00004.safetensors",
        "diffusion_pytorch_model-00004-of-00004.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    assert_same_tensors(reference.state_dict(), load_pretrained_files(tmp_path)[1])


def test_saving_keeps_other_variants_and_unrelated_files(reference, config, tmp_path):
    save_pretrained(reference, tmp_path, config=config, variant="fp16", max_shard_size=SMALL_SHARD)
    (tmp_path / "README.md").write_text("notes")
    fp16_files = {name for name in os.listdir(tmp_path) if "fp16" in name}

    save_pretrained(reference, tmp_path, config=config)
    assert fp16_files < set(os.listdir(tmp_path))
    assert (tmp_path / "README.md").read_text() == "notes"


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4, bias=False)
        self.decoder = torch.nn.Linear(4, 4, bias=False)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("transposed", torch.arange(6.0).reshape(2, 3).t())  # not contiguous


@pytest.mark.parametrize("safe", [True, False])
def test_tied_and_non_contiguous_tensors_save(tmp_path, safe):
    model = Tied()
    save_pretrained(model, tmp_path, config={}, safe_serialization=safe)
    _, state_dict = load_pretrained_files(tmp_path, allow_pickle=True)
    assert_same_tensors(model.state_dict(), state_dict)
    fresh = Tied()
    load_state_dict_strict(fresh, state_dict)
    assert fresh.decoder.weight is fresh.encoder.weight  # copying in place keeps the tie


def test_save_directory_that_is_a_file(reference, config, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(CheckpointError, match="is a file") as excinfo:
        save_pretrained(reference, path, config=config)
    assert str(path) in str(excinfo.value)


def test_saving_meta_tensors_is_refused(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="meta device.*'weight', 'bias'"):
        save_pretrained(model, tmp_path, config={})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "size, expected",
    [
        (123, 123),
        ("10GB", 10 * 10**9),
        ("200MB", 200 * 10**6),
        ("10KB", 10_000),
        (" 1.5 mb", 1_500_000),
        ("2TB", 2 * 10**12),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["10", "5GiB", "GB", "-1KB", 0, -5, True, 1.5])
def test_bad_max_shard_size_is_refused_before_writing(reference, config, tmp_path, size):
    with pytest.raises(CheckpointError, match="max_shard_size"):
        save_pretrained(reference, tmp_path / "out", config=config, max_shard_size=size)
    assert not (tmp_path / "out").exists()


@given(
    # Non-empty tensors: huggingface_hub groups all empty tensors as if tied (one null storage).
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
    max_shard_size=st.integers(min_value=1, max_value=120),
)
def test_shards_match_huggingface_hub(sizes, max_shard_size):
    """Shard names and contents equal huggingface_hub's split for any tensor sizes and limit."""
    module = torch.nn.Module()
    for number, size in enumerate(sizes):
        module.register_buffer(f"t{number}", torch.zeros(size, dtype=torch.uint8))
    split = split_torch_state_dict_into_shards(
        module.state_dict(),
        max_shard_size=max_shard_size,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
    )
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(module, folder, config={}, max_shard_size=max_shard_size)
        expected = set(split.filename_to_tensors) | {"config.json"}
        if split.is_sharded:
            expected.add("diffusion_pytorch_model.safetensors.index.json")
            index_path = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
            index = json.loads(read_text(index_path))
            assert index["weight_map"] == split.tensor_to_filename
            assert index["metadata"] == split.metadata
        assert set(os.listdir(folder)) == expected
        for name, keys in split.filename_to_tensors.items():
            with safetensors.safe_open(os.path.join(folder, name), "pt") as file:
                assert sorted(file.keys()) == sorted(keys)


def test_module_exports():
    assert set(checkpoint.__all__) == {
        "CheckpointError",
        "load_pretrained_files",
        "load_state_dict_strict",
        "parse_size",
        "save_pretrained",
    }
    assert issubclass(CheckpointError, ValueError)
