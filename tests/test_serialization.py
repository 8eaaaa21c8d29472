"""save_quantized / load_quantized: bit-exact round trips, and clear errors that leave the model
untouched when the model or the files do not match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.api import is_converted, is_prepared
from modiff_quant.layers import QuantizedLayer
from modiff_quant.quant import Granularity
from modiff_quant.recipe.document import plan_document, recipe_document
from modiff_quant.serialization import CONFIG, PLAN, RECIPE, TENSORS

STEPS = 8
INT4_ATTENTION = """version: 1
extends: w8a4-modiff-torchao
rules:
  - match: re:.*attentions\\.0\\.to_[qkv]
    w_bits: 4   # torchao packs 4-bit Linear weights into its int4 CPU layout
"""


def recipe_path(name: str, folder: Path) -> str | Path:
    """A shipped recipe, or (`int4`) one whose attention projections torchao packs to int4."""
    if name != "int4":
        return name
    path = folder / "int4-attention.yaml"
    path.write_text(INT4_ATTENTION, encoding="utf-8")
    return path


def converted(recipe: str | Path | mq.Recipe, seed: int = 0) -> tuple[torch.nn.Module, list]:
    model = tiny_unet(seed)
    inputs = ddim_inputs(model, STEPS)
    mq.prepare(model, recipe)
    with torch.no_grad(), mq.calibrate(model):
        for x, t in inputs:
            model(x, t)
    mq.convert(model)
    return model, inputs


def trajectory(model: torch.nn.Module, inputs: list) -> list[torch.Tensor]:
    with torch.no_grad(), mq.sampling(model):
        return [model(x, t).sample for x, t in inputs]


def untouched(model: torch.nn.Module) -> bool:
    return not is_prepared(model) and not any(isinstance(m, QuantizedLayer) for m in model.modules())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model, _ = converted("w8a4-modiff-ptq4dm")
    return mq.save_quantized(model, tmp_path_factory.mktemp("saved"))


@pytest.mark.parametrize(
    "recipe",
    [
        "w8a4-modiff",
        pytest.param("w8a4-modiff-ptq4dm", marks=pytest.mark.slow),
        "adaptive-cache",
        "int4",
        "w8a4-modiff-attn8",
    ],
)
def test_save_load_sample_is_bit_identical(tmp_path, recipe):
    model, inputs = converted(recipe_path(recipe, tmp_path))
    assert any(layer.packed for layer in model.modules() if isinstance(layer, QuantizedLayer)) == (recipe == "int4")
    saved = mq.save_quantized(model, tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == sorted([TENSORS, RECIPE, PLAN, CONFIG])
    # every tensor comes from the files: a float model with other weights loads the same model,
    # except torchao's packed int4 weights, which are re-made from the float weights they came from
    fresh = tiny_unet(seed=0 if recipe == "int4" else 1)
    loaded = mq.load_quantized(fresh, saved)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model, inputs), trajectory(loaded, inputs)))
    assert plan_document(mq.plan_of(loaded)) == plan_document(mq.plan_of(model))
    if recipe == "int4":
        with pytest.raises(mq.LoadError, match="torchao-packed weights .* pass the float model"):
            mq.load_quantized(saved)
    else:  # no float model at all: built from config.json
        built = mq.load_quantized(saved)
        assert all(torch.equal(a, b) for a, b in zip(trajectory(model, inputs), trajectory(built, inputs)))


def test_packed_weights_need_the_float_weights_they_were_made_from(tmp_path):
    model, _ = converted(recipe_path("int4", tmp_path))
    saved = mq.save_quantized(model, tmp_path / "saved")
    other = tiny_unet(seed=1)
    with pytest.raises(
        mq.LoadError,
        match=r"layer '[\w.]+to_q': its weight was packed by torchao_int4 .* not the one it was made from",
    ):
        mq.load_quantized(other, saved)
    assert untouched(other)


def test_a_renamed_layer_is_named(saved):
    model = tiny_unet()
    model.conv_last = model.conv_out
    del model.conv_out
    with pytest.raises(
        mq.LoadError,
        match=r"layer 'conv_out' of the saved model is not in this model; this model has 'conv_last' \(renamed\?\)",
    ):
        mq.load_quantized(model, saved)
    assert untouched(model)


def test_another_architecture_is_named(saved):
    from diffusers import UNet2DModel

    config = {k: v for k, v in tiny_unet().config.items() if not k.startswith("_")}
    model = UNet2DModel(**config | {"block_out_channels": (16, 24)})
    with pytest.raises(
        mq.LoadError, match=r"tensor '[\w.]+': saved as \[\d+(, \d+)*\] torch.float32, this model has \[\d+(, \d+)*\]"
    ):
        mq.load_quantized(model, saved)
    assert untouched(model)


def damage(folder: Path, tmp_path: Path, name: str, edit) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    target = copy / name
    target.write_bytes(edit(target.read_bytes()))
    return copy


def flip_byte(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1 :]


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        (
            TENSORS,
            lambda b: b[: len(b) // 2],
            r"model.safetensors is truncated or was replaced: \d+ bytes, \d+ were saved",
        ),
        (TENSORS, flip_byte, r"model.safetensors is corrupt: its SHA-256 differs from the one saved in plan.json"),
        (RECIPE, lambda b: b.replace(b"a_bits: 4", b"a_bits: 3"), r"recipe.yaml is corrupt: its SHA-256 differs"),
        (PLAN, lambda b: b[: len(b) // 2], r"plan.json is damaged or truncated \(.*\); save the model again"),
        (
            PLAN,
            lambda b: json.dumps(json.loads(b) | {"format": 99}).encode(),
            r"plan.json: format 99 \(written by modiff-quant [\d.]+\); modiff-quant [\d.]+ reads format 1",
        ),
        (
            PLAN,
            lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "packed_weights"}).encode(),
            r"plan.json is damaged: it lacks packed_weights",
        ),
    ],
    ids=["truncated-tensors", "flipped-byte", "edited-recipe", "truncated-plan", "newer-format", "missing-key"],
)
def test_damaged_files_fail_clearly_and_change_nothing(saved, tmp_path, name, edit, message):
    folder = damage(saved, tmp_path, name, edit)
    model = tiny_unet()
    with pytest.raises(mq.LoadError, match=message):
        mq.load_quantized(model, folder)
    assert untouched(model)


def test_missing_files_and_wrong_use(saved, tmp_path):
    with pytest.raises(mq.LoadError, match=r"plan.json not found: .* is not a model written by save_quantized\(\)"):
        mq.load_quantized(tiny_unet(), tmp_path)
    folder = damage(saved, tmp_path, TENSORS, lambda b: b)
    (folder / TENSORS).unlink()
    with pytest.raises(mq.LoadError, match=r"model.safetensors not found \(part of the saved model\)"):
        mq.load_quantized(tiny_unet(), folder)
    prepared = mq.prepare(tiny_unet(), "w8a4-modiff")
    with pytest.raises(RuntimeError, match=r"save_quantized\(\) needs a converted model"):
        mq.save_quantized(prepared, tmp_path / "out")
    with pytest.raises(RuntimeError, match="already prepared by modiff_quant"):
        mq.load_quantized(prepared, saved)


@pytest.mark.parametrize("name", mq.shipped_recipes())
def test_flat_recipe_document_parses_back_to_the_same_plan(tmp_path, name):
    recipe = mq.load_recipe(name)
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(recipe_document(recipe), sort_keys=False), encoding="utf-8")
    assert "extends" not in path.read_text(encoding="utf-8")
    reloaded = mq.load_recipe(path)
    assert (reloaded.defaults, reloaded.strict, reloaded.name) == (recipe.defaults, recipe.strict, recipe.name)
    assert [(r.patterns, dict(r.settings), r.steps, r.skip_threshold) for r in reloaded.rules] == [
        (r.patterns, dict(r.settings), r.steps, r.skip_threshold) for r in recipe.rules
    ]


def test_quantized_weights_are_stored_as_codes(tmp_path):
    """W8 weights as uint8 codes into per-channel tables: a 2048-wide layer takes 2 KiB of codes
    and 1 KiB of table per channel instead of 8 KiB of float32."""
    model = mq.convert(mq.prepare(torch.nn.Sequential(torch.nn.Linear(2048, 64)), "w8a8-modiff"))
    saved = mq.save_quantized(model, tmp_path)
    assert json.loads((saved / PLAN).read_text(encoding="utf-8"))["coded_weights"] == ["0"]
    assert (saved / TENSORS).stat().st_size < 0.4 * 2048 * 64 * 4
    loaded = mq.load_quantized(torch.nn.Sequential(torch.nn.Linear(2048, 64)), saved)
    assert torch.equal(loaded[0].weight, model[0].weight)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_codes_are_lossless_bit_for_bit(bits):
    from modiff_quant.weight_codes import decode, encode

    generator = torch.Generator().manual_seed(bits)
    levels = torch.randn(6, 1 << bits, generator=generator)
    levels[0, 0], levels[0, 1] = 0.0, -0.0  # two bit patterns, one value: both kept
    weight = levels.gather(1, torch.randint(1 << bits, (6, 3 * 3 * 5), generator=generator)).reshape(6, 5, 3, 3)
    codes, table = encode(weight, bits)
    assert (
        codes.dtype == torch.uint8
        and codes.shape == weight.shape
        and table.shape[0] == 6
        and table.shape[1] <= 1 << bits
    )
    assert torch.equal(decode(codes, table).view(torch.int32), weight.view(torch.int32))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(
            decode(*encode(weight.to(dtype), bits)).view(torch.int16), weight.to(dtype).view(torch.int16)
        )


def test_weights_with_more_values_than_codes_stay_float():
    from modiff_quant.weight_codes import encode

    assert encode(torch.randn(4, 300), 8) is None  # e.g. group-wise scales finer than a channel
    assert encode(torch.randn(4, 16), 16) is None


# Options holding a mapping or a list, as the docs write them (iteration and sample counts cut for speed).
LIST_AND_MAPPING_OPTIONS = {
    "static": "{name: static, observer: mse, observer_options: {p: 2.4}}",
    "ptq4dm": "{name: ptq4dm, observer_options: {p: 2.4, grid: 20, max_values: 4096}, samples: 64}",
    "qdiffusion": (
        "{name: qdiffusion, observer: mse, observer_options: {p: 2.4, grid: 10}, beta: [20, 2], "
        "blocks: [ResnetBlock2D, Attention], weight_iters: 2, act_iters: 2, samples_per_step: 8}"
    ),
    "adaround": (
        "{name: adaround, weight_observer: mse, weight_observer_options: {grid: 10}, beta: [20, 2], "
        "blocks: [ResnetBlock2D, Attention], iters: 2, samples_per_step: 8}"
    ),
    "gptq": (
        "{name: gptq, weight_observer: mse, weight_observer_options: {grid: 10}, samples_per_step: 8, damp: 0.05, "
        "act_order: true}"
    ),
}
OPTION_RECIPES = ["w8a4-modiff"] + [
    name for name in mq.shipped_recipes() if mq.load_recipe(name).defaults.base_quantizer in LIST_AND_MAPPING_OPTIONS
]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "qdiffusion" in n or "ptq4dm" in n else n for n in OPTION_RECIPES],
)
def test_options_holding_mappings_and_lists_round_trip(tmp_path, name):
    """Every shipped recipe on a base quantizer that takes mapping or list options, with such
    options (w8a4-modiff on `static`): saved as plain YAML, loaded bit-identically."""
    base = mq.load_recipe(name).defaults.base_quantizer
    options = LIST_AND_MAPPING_OPTIONS.get(base, LIST_AND_MAPPING_OPTIONS["static"])
    path = tmp_path / "options.yaml"
    path.write_text(
        f"version: 1\nextends: {name}\ndefaults:\n  base_quantizer: {options}\n  a_granularity: tensor\n",
        encoding="utf-8",
    )
    model, inputs = converted(path)
    saved = mq.save_quantized(model, tmp_path / "saved")
    written = yaml.safe_load((saved / RECIPE).read_text(encoding="utf-8"))["defaults"]["base_quantizer"]
    assert written == yaml.safe_load(options)
    loaded = mq.load_quantized(tiny_unet(seed=1), saved)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model, inputs), trajectory(loaded, inputs)))


def brevitas_model() -> torch.nn.Module:
    """Two Brevitas layers as layerwise_quantize makes them: the second quantizes its input."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat

    torch.manual_seed(0)
    return torch.nn.Sequential(
        qnn.QuantLinear(16, 16, bias=True), qnn.QuantLinear(16, 8, bias=True, input_quant=Int8ActPerTensorFloat)
    ).eval()


def test_injector_classes_are_saved_by_name(tmp_path):
    """Brevitas injector classes (of adopted layers, or given from Python) are written as
    "module:Class" and resolve back to the same classes on load."""
    from brevitas.quant import Int8WeightPerChannelFloat, ShiftedUint8ActPerTensorFloat

    inputs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    given = mq.load_recipe("w8a4-modiff-brevitas").overriding(
        {
            "base_quantizer": "brevitas",
            "base_quantizer_options": {
                "weight_quant": Int8WeightPerChannelFloat,
                "act_quant": ShiftedUint8ActPerTensorFloat,
            },
        },
        "classes",
    )
    for model, recipe, fresh in (
        (brevitas_model(), "w8a8-modiff", brevitas_model),
        (torch.nn.Sequential(torch.nn.Linear(16, 8)), given, lambda: torch.nn.Sequential(torch.nn.Linear(16, 8))),
    ):
        mq.prepare(model, recipe)
        with torch.no_grad(), mq.calibrate(model):
            for x in inputs:
                model(x)
        mq.convert(model)
        folder = mq.save_quantized(model, tmp_path / f"saved-{len(model)}")
        options = json.loads((folder / PLAN).read_text(encoding="utf-8"))["plan"]["layers"]["0"]["settings"][
            "base_quantizer"
        ]
        assert all(
            options[key].startswith("brevitas.") and ":" in options[key]
            for key in ("weight_quant", "act_quant")
            if key in options
        ), options
        loaded = mq.load_quantized(fresh(), folder)
        with torch.no_grad(), mq.sampling(model), mq.sampling(loaded):
            assert all(torch.equal(model(x), loaded(x)) for x in inputs)


def small_converted() -> torch.nn.Module:
    torch.manual_seed(0)
    return mq.convert(mq.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8)), "w8a8-modiff"))


def failing_second_write(monkeypatch) -> None:
    """Make the write of the second file fail, as a full disk would."""
    from modiff_quant import atomic_files

    real, written = atomic_files.write_durably, []

    def write(path: Path, content: bytes) -> None:
        written.append(path)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        real(path, content)

    monkeypatch.setattr(atomic_files, "write_durably", write)


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    failing_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        mq.save_quantized(small_converted(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_over_a_saved_model_leaves_it_loadable(tmp_path, monkeypatch):
    model = small_converted()
    folder = mq.save_quantized(model, tmp_path / "out")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    other = small_converted()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    failing_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        mq.save_quantized(other, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    monkeypatch.undo()
    mq.save_quantized(other, folder)  # replaces the files
    assert sorted(path.name for path in folder.iterdir()) == sorted([TENSORS, RECIPE, PLAN])
    assert torch.equal(mq.load_quantized(torch.nn.Sequential(torch.nn.Linear(16, 8)), folder)[0].bias, other[0].bias)


def test_options_that_are_not_recipe_data_fail_before_anything_is_written(tmp_path):
    """From Python, an option may hold what YAML cannot write (here a NumPy number): the error names
    it before the folder exists."""
    options = {"observer": "mse", "observer_options": {"p": np.float64(2.4)}}
    recipe = mq.load_recipe("w8a8-modiff").overriding(
        {"base_quantizer": "static", "base_quantizer_options": options, "a_granularity": Granularity("tensor")},
        "numpy",
    )
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    mq.prepare(model, recipe)
    with torch.no_grad(), mq.calibrate(model):
        for _ in range(2):  # MoDiff observes the difference to the step before
            model(torch.randn(4, 16))
    mq.convert(model)
    with pytest.raises(
        ValueError,
        match=r"base_quantizer option 'observer_options'\['p'\]: float64 np.float64\(2.4\) is not recipe data",
    ):
        mq.save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def with_config(saved: Path, tmp_path: Path, config: dict | None) -> Path:
    """A copy of `saved` whose config.json is `config` (None: removed), checksums made to match."""
    import hashlib
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    manifest = json.loads((folder / PLAN).read_text(encoding="utf-8"))
    if config is None:
        (folder / CONFIG).unlink()
        del manifest["files"][CONFIG]
    else:
        content = json.dumps(config).encode()
        (folder / CONFIG).write_bytes(content)
        manifest["files"][CONFIG] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (folder / PLAN).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (None, "has no config.json .* pass the float model, load_quantized\\(model, folder\\)"),
        ({"down_block_types": ["NoSuchBlock2D"]}, "UNet2DModel cannot be built from it"),
        ({"_class_name": "DDIMScheduler"}, "_class_name DDIMScheduler is not the saved model's diffusers class"),
        ({"_class_name": "__builtins__"}, "_class_name __builtins__ is not the saved model's diffusers class"),
        ({"block_out_channels": [4096, 4096]}, "far larger than the saved tensors"),
    ],
)
def test_a_model_built_from_config_is_a_diffusers_class_of_the_saved_size(saved, tmp_path, edit, message):
    """config.json is data from whoever sent it: it names a class, which must be the saved
    model's diffusers class, and sizes a model, which must fit the saved tensors."""
    config = None
    if edit is not None:
        config = {**json.loads((saved / CONFIG).read_text(encoding="utf-8")), **edit}
    with pytest.raises(mq.LoadError, match=message):
        mq.load_quantized(with_config(saved, tmp_path, config))


def test_a_model_built_from_config_needs_the_saved_tensors(saved, tmp_path):
    folder = with_config(saved, tmp_path, json.loads((saved / CONFIG).read_text(encoding="utf-8")))
    (folder / TENSORS).unlink()
    with pytest.raises(mq.LoadError, match="model.safetensors not found"):
        mq.load_quantized(folder)


def test_load_quantized_wants_a_folder_and_a_model_in_order(saved):
    with pytest.raises(TypeError, match="the folder to load is missing"):
        mq.load_quantized(tiny_unet())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mq.load_quantized(str(saved), saved)


STATIC_SPLIT = """version: 1
extends: w8a4-modiff
defaults:
  base_quantizer: static
  a_granularity: tensor
  split: true
"""


def test_prepare_then_load_state_dict_gives_the_converted_model(tmp_path):
    """torchao users' habit: prepare a float model, load a converted model's state_dict (scale
    keys included), sample: the same outputs, no calibration. Float weights loaded into a
    prepared model leave it waiting for calibration; a state_dict missing a layer's scales fails
    a strict load, naming the layer; a split input's division is not in a state_dict."""
    model, inputs = converted("w8a4-modiff-ptq4dm")
    state = model.state_dict()
    fresh = mq.prepare(tiny_unet(seed=1), "w8a4-modiff-ptq4dm")
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model, inputs), trajectory(fresh, inputs)))

    waiting = mq.prepare(tiny_unet(seed=1), "w8a4-modiff-ptq4dm")
    waiting.load_state_dict(tiny_unet(seed=2).state_dict(), strict=False)
    assert not is_converted(waiting) and mq.api.needs_calibration(waiting)

    partial = {k: v for k, v in state.items() if not k.startswith("conv_in.act_quantizers")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*conv_in\.act_quantizers \(frozen scales\)"):
        mq.prepare(tiny_unet(seed=1), "w8a4-modiff-ptq4dm").load_state_dict(partial)

    split_recipe = tmp_path / "split.yaml"
    split_recipe.write_text(STATIC_SPLIT, encoding="utf-8")
    split, _ = converted(split_recipe)
    assert any(layer.split_at for layer in split.modules() if isinstance(layer, QuantizedLayer))
    with pytest.raises(
        RuntimeError, match=r"a state_dict does not say where they divide; load it with .*load_quantized"
    ):
        mq.prepare(tiny_unet(seed=1), split_recipe).load_state_dict(split.state_dict())
