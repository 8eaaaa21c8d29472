"""A saved checkpoint is data from a stranger: `load_quantized` loads it, or raises `LoadError`
naming the file, layer or tensor at fault, in bounded time, and a failed load leaves the model
exactly as it was. The tamperer here knows the format: checksums in plan.json are recomputed
after every edit, so the checks behind them are what is tested."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ddim_inputs, tiny_unet
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import nn

import modiff_quant as mq
from modiff_quant.serialization import CONFIG, PLAN, RECIPE, TENSORS

STEPS = 4
SPLIT, GROUPS, SYMMETRIC, BREVITAS, PACKED = (
    "up_blocks.1.resnets.0.conv_shortcut",  # fed by a concatenation: split quantizers
    "down_blocks.0.resnets.0.conv2",  # two timestep groups
    "mid_block.attentions.0.to_q",  # per-channel symmetric activation scales
    "mid_block.attentions.0.to_v",  # a Brevitas QuantIdentity's state
    "mid_block.attentions.0.to_out.0",  # torchao int4: re-packed on load
)
RECIPE_TEXT = f"""version: 1
description: one layer per kind of saved state, the rest float (fast to load)
defaults:
  scheme: plain
  w_bits: float
  a_bits: float
rules:
  - match: [{SPLIT}, up_blocks.1.resnets.0.conv1]
    scheme: modiff
    w_bits: 8
    a_bits: 4
    base_quantizer: {{name: static, observer: mse, observer_options: {{p: 2.4, grid: 10}}}}
    split: true
    first_step: quantized
  - match: {GROUPS}
    scheme: modiff
    w_bits: 6
    a_bits: 6
    base_quantizer: static
    timestep_groups: 2
  - match: [{SYMMETRIC}, mid_block.attentions.0.to_k]
    w_bits: 8
    a_bits: 8
    base_quantizer: static
    a_granularity: channel
    a_symmetric: true
  - match: {BREVITAS}
    scheme: modiff
    w_bits: 8
    a_bits: 8
    base_quantizer: brevitas
  - match: {PACKED}
    scheme: modiff
    w_bits: 4
    w_granularity: group:32
    w_symmetric: false
    a_bits: 8
    base_quantizer: torchao_int4
"""
LOAD_LIMIT_S = 5.0  # a load takes about 0.1 s here; the bound leaves room for a busy machine


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs(float_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return ddim_inputs(float_model, STEPS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, float_model, inputs) -> dict[str, bytes]:
    """The files of a checkpoint with every kind of saved state."""
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "fuzz.yaml").write_text(RECIPE_TEXT, encoding="utf-8")
    model = copy.deepcopy(float_model)
    mq.prepare(model, folder / "fuzz.yaml")
    with torch.no_grad(), mq.calibrate(model):
        for x, t in inputs:
            model(x, t)
    mq.convert(model)
    out = mq.save_quantized(model, folder / "saved")
    return {path.name: path.read_bytes() for path in out.iterdir()}


def write(folder: Path, files: dict[str, bytes]) -> Path:
    """The checkpoint `files` in `folder`, with plan.json's sizes and SHA-256 recomputed for them
    (when plan.json still parses): damage that gets past the checksums."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    facts = {
        name: {"bytes": len(files[name]), "sha256": hashlib.sha256(files[name]).hexdigest()}
        for name in (TENSORS, RECIPE, CONFIG)
        if name in files
    }
    try:
        manifest = json.loads(files[PLAN])
        if manifest["files"] != facts:
            manifest["files"] = facts
            files = {**files, PLAN: json.dumps(manifest).encode()}
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        pass  # plan.json itself was damaged: nothing to recompute
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def edit_tensors(files: dict[str, bytes], edit: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, bytes]:
    tensors = load(files[TENSORS])
    edit(tensors)
    return {
        **files,
        TENSORS: save(
            {key: value.contiguous() for key, value in tensors.items()}, metadata={"format": "modiff-quant/1"}
        ),
    }


def edit_plan(files: dict[str, bytes], edit: Callable[[dict[str, Any]], None]) -> dict[str, bytes]:
    manifest = json.loads(files[PLAN])
    edit(manifest)
    return {**files, PLAN: json.dumps(manifest).encode()}


def snapshot(model: nn.Module) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """Everything a load changes: classes, attributes (a forward replaced by a block cache
    included), hooks, and every tensor."""
    modules = [
        (
            name,
            type(m),
            sorted(vars(m)),
            list(m._forward_pre_hooks),
            list(m._forward_hooks),
            sorted(m._buffers),
            sorted(m._parameters),
        )
        for name, m in model.named_modules()
    ]
    return modules, {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[Any], dict[str, torch.Tensor]]) -> None:
    modules, state = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[key], before[1][key]) for key in state)


def load_or_refuse(model: nn.Module, folder: Path) -> mq.LoadError | None:
    """Load; on failure, the LoadError (anything else fails the test), the model unchanged."""
    before = snapshot(model)
    start = time.perf_counter()
    try:
        mq.load_quantized(model, folder)
    except mq.LoadError as exc:
        assert_unchanged(model, before)
        assert len(str(exc)) < 2000, str(exc)[:300]
        return exc
    finally:
        assert time.perf_counter() - start < LOAD_LIMIT_S
    return None


def first_steps_are_finite(model: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    with torch.no_grad(), mq.sampling(model):
        return all(bool(model(x, t).sample.isfinite().all()) for x, t in inputs[:2])


def scale_of(layer: str, quantizer: str = "delta.0.") -> str:
    return f"modiff/{layer}/{quantizer}{'first.' if layer == SPLIT else ''}scale"


def setting(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key])

    return edit


# Before the checks these cases test, 33 of the 38 loaded (then computed garbage or NaN, or failed
# at the first call), left the model half-changed, or raised another exception than LoadError;
# the others were refused with a vaguer message.
TENSOR_CASES = {
    "scale of another shape": (
        setting(scale_of(SPLIT), lambda s: torch.ones(1, 3, 1, 1)),
        rf"layer '{SPLIT}': tensors 'modiff/{SPLIT}/delta.0.\*' \(its delta quantizer 0\) cannot be used: "
        r"scale and zero_point must be float tensors of one shape",
    ),
    "scale and zero point of another width": (
        lambda t: t.update(
            {
                key: torch.cat([t[key], t[key]], dim=1)
                for key in (scale_of(SPLIT, "raw.0."), scale_of(SPLIT, "raw.0.").replace("scale", "zero_point"))
            }
        ),
        rf"tensors 'modiff/{SPLIT}/raw.0.\*' .* cannot be used: The size of tensor",
    ),
    "NaN scale": (
        setting(scale_of(GROUPS, "delta.1."), lambda s: torch.full_like(s, float("nan"))),
        rf"'modiff/{GROUPS}/delta.1.\*' .* scale must be finite and > 0",
    ),
    "negative scale": (setting(scale_of(GROUPS), torch.neg), r"scale must be finite and > 0"),
    "zero point out of range": (
        setting(scale_of(GROUPS).replace("scale", "zero_point"), lambda z: z + 64),
        r"zero_point must hold integers in \[0, 63\]",
    ),
    "fractional zero point": (
        setting(scale_of(GROUPS).replace("scale", "zero_point"), lambda z: z + 0.5),
        r"zero_point must hold integers",
    ),
    "symmetric zero point not 0": (
        setting(f"modiff/{SYMMETRIC}/raw.0.zero_point", lambda z: z + 1),
        r"zero_point must hold integers in \[0, 0\]",
    ),
    "split point past the input": (
        setting(f"modiff/{SPLIT}/split_at", lambda s: torch.tensor(48)),
        rf"tensor 'modiff/{SPLIT}/split_at' must be one int64 in 1..47 of a layer that splits its input, "
        r"got torch.int64 \[\] 48",
    ),
    "split point of two values": (
        setting(f"modiff/{SPLIT}/split_at", lambda s: torch.tensor([32, 16])),
        r"split_at' must be one int64 in 1..47 of a layer that splits its input, got torch.int64 \[2\]$",
    ),
    "zero point lost": (
        lambda t: t.pop(scale_of(GROUPS).replace("scale", "zero_point")),
        rf"tensors 'modiff/{GROUPS}/delta.0.\*' \(its delta quantizer 0\) cannot be used: "
        r"expected scale and zero_point, got scale$",
    ),
    "split point as float": (
        setting(f"modiff/{SPLIT}/split_at", lambda s: s.double()),
        r"split_at' must be one int64",
    ),
    "quantizer of no group": (
        lambda t: t.update({f"modiff/{GROUPS}/delta.2.scale": torch.ones(1)}),
        rf"tensor 'modiff/{GROUPS}/delta.2.scale' belongs to no quantizer of this layer",
    ),
    "second half of an unsplit input": (
        lambda t: t.pop(f"modiff/{SPLIT}/split_at"),
        rf"tensors 'modiff/{SPLIT}/raw.0.\*' \(its raw quantizer 0\) cannot be used: "
        r"unexpected second\.\w+, second\.\w+ \(the input is not split\)",
    ),
    "state of a float layer": (
        lambda t: t.update({"modiff/conv_in/delta.0.scale": torch.ones(1)}),
        r"tensor 'modiff/conv_in/delta.0.scale' of model.safetensors belongs to no quantizer of a quantized layer",
    ),
    "a weight among the quantizers": (
        lambda t: t.update({f"modiff/{GROUPS}/weight": torch.zeros(16, 16, 3, 3)}),
        r"belongs to no quantizer of a quantized layer",
    ),
    "non-finite Brevitas scale": (
        lambda t: t.update(
            {
                key: torch.full_like(value, float("inf"))
                for key, value in list(t.items())
                if key.startswith(f"modiff/{BREVITAS}/") and "scaling_impl" in key
            }
        ),
        rf"'modiff/{BREVITAS}/delta.0.\*' .* non-finite values in act_quant",
    ),
    "code past its table": (
        setting(f"codes/{GROUPS}/codes", lambda c: torch.full_like(c, 255)),
        rf"layer '{GROUPS}': its coded weight \(codes/{GROUPS}/\) is damaged: "
        r"code 255 is past the \d+ values of the table",
    ),
    "NaN in a weight table": (
        setting(f"codes/{GROUPS}/table", lambda t: torch.full_like(t, float("nan"))),
        r"is damaged: the table holds non-finite values",
    ),
    "codes of another dtype": (setting(f"codes/{GROUPS}/codes", lambda c: c.long()), r"codes must be uint8"),
    "codes lost": (
        lambda t: t.pop(f"codes/{GROUPS}/codes"),
        rf"plan.json lists the weight of '{GROUPS}' as coded, but model.safetensors lacks its codes or table",
    ),
    "coded weight also as floats": (
        lambda t: t.update({f"{GROUPS}.weight": torch.zeros(16, 16, 3, 3)}),
        rf"lists the weight of '{GROUPS}' as coded, but also as floats",
    ),
    "NaN in a float tensor": (
        setting("conv_in.bias", lambda b: torch.full_like(b, float("nan"))),
        r"tensor 'conv_in.bias' holds non-finite values",
    ),
}


def nested(depth: int) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda files: {
        **files,
        PLAN: files[PLAN].replace(b'"zero_bit_steps": []', b'"zero_bit_steps": ' + b"[" * depth + b"]" * depth, 1),
    }


def padded_header(files: dict[str, bytes]) -> dict[str, bytes]:
    """A valid safetensors file whose header is padded with spaces (the format allows it) past the bound."""
    content = files[TENSORS]
    size = int.from_bytes(content[:8], "little")
    header = content[8 : 8 + size] + b" " * (17 << 20)
    return {**files, TENSORS: len(header).to_bytes(8, "little") + header + content[8 + size :]}


def extending(files: dict[str, bytes]) -> dict[str, bytes]:
    """recipe.yaml extends a file beside it (holding the saved recipe): the plan is the same."""
    return {**files, RECIPE: b"version: 1\nextends: base.yaml\n", "base.yaml": files[RECIPE]}


def plan_setting(*path: Any, value: Any) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    def edit(manifest: dict[str, Any]) -> None:
        for key in path[:-1]:
            manifest = manifest[key]
        manifest[path[-1]] = value

    return lambda files: edit_plan(files, edit)


FILE_CASES = {
    "coded weights as a string": (
        plan_setting("coded_weights", value=GROUPS),
        r"plan.json is damaged: 'coded_weights' is not as save_quantized\(\) writes it; save the model again",
    ),
    "packed weights as a list": (
        plan_setting("packed_weights", value=[]),
        r"'packed_weights' is not as save_quantized\(\) writes it",
    ),
    "digest not hexadecimal": (
        plan_setting("packed_weights", PACKED, value="x"),
        rf"'packed_weights.{PACKED}' is not as",
    ),
    "newer format, versions not a mapping": (
        lambda f: plan_setting("versions", value=5)(plan_setting("format", value=2)(f)),
        r"plan.json: format 2 \(written by modiff-quant \?\); modiff-quant [\d.]+ reads format 1",
    ),
    "format true": (plan_setting("format", value=True), r"'format' is not as"),
    "layer entry as a list": (plan_setting("plan", "layers", GROUPS, value=[]), rf"'plan.layers.{GROUPS}' is not as"),
    "settings as a string": (
        plan_setting("plan", "layers", GROUPS, "settings", value="x"),
        rf"'plan.layers.{GROUPS}.settings' is not as",
    ),
    "unknown field": (plan_setting("signed_by", value="me"), r"plan.json is damaged: unknown fields signed_by"),
    "NaN": (
        plan_setting("versions", "torch", value=float("nan")),
        r"plan.json is damaged or truncated \(NaN is not a number save_quantized\(\) writes",
    ),
    "nested past the recursion limit": (nested(100_000), r"plan.json is damaged or truncated \(.*recursion"),
    "nested deeper than a plan": (nested(200), r"plan.json is damaged: nested deeper than the 32 levels"),
    "plan over the size bound": (
        lambda f: {**f, PLAN: f[PLAN] + b" " * (17 << 20)},
        r"plan.json is larger than the 16777216 bytes of any plan",
    ),
    "header over the size bound": (
        padded_header,
        r"model.safetensors: its header claims \d+ bytes, more than the 16777216",
    ),
    "recipe extends another file": (
        extending,
        r"recipe.yaml:\d+: a saved recipe is flat \(save_quantized\(\) merges the extends chain\), "
        r"but this one extends another",
    ),
    "recipe not UTF-8": (
        lambda f: {**f, RECIPE: f[RECIPE] + b"# \xff\n"},
        r"recipe.yaml is not UTF-8 text \(invalid start byte at byte \d+\)",
    ),
    "recipe over the size bound": (
        lambda f: {**f, RECIPE: f[RECIPE] + b"#" * (1 << 20)},
        r"recipe.yaml: plan.json says it has \d+ bytes, more than the 1048576",
    ),
}


@pytest.mark.parametrize(
    ("kind", "case"), [("tensors", c) for c in sorted(TENSOR_CASES)] + [("files", c) for c in sorted(FILE_CASES)]
)
def test_tampered_checkpoint_is_refused_by_name_and_changes_nothing(saved, float_model, tmp_path, kind, case):
    edit, message = TENSOR_CASES[case] if kind == "tensors" else FILE_CASES[case]
    files = edit_tensors(saved, edit) if kind == "tensors" else edit(saved)
    error = load_or_refuse(copy.deepcopy(float_model), write(tmp_path / "case", files))
    assert error is not None and re.search(message, str(error)), error


def test_the_untampered_checkpoint_loads(saved, float_model, inputs, tmp_path):
    """The cases above fail for what they change, not for the checkpoint they start from."""
    model = copy.deepcopy(float_model)
    assert load_or_refuse(model, write(tmp_path / "case", saved)) is None
    assert first_steps_are_finite(model, inputs)


# --- fuzzing: random edits of every part of the checkpoint ----------------------------------------

LONG = settings.default.max_examples > 100
"""The project's long fuzz run (--hypothesis-profile=fuzz-long, see tests/conftest.py): its example
count, random; otherwise 80 derandomized examples (about 15 s on 2 cores)."""
FILLS = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e38, 1e-45, 0.5, 3.0, 255.0)
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from([GROUPS, "Conv2d", "static", "a" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
RECIPE_LINES = (
    "extends: w8a4-modiff",
    "version: 2",
    "strict: true",
    "  a_bits: 3",
    "    w_bits: 16",
    "    scheme: plain",
    "    split: false",
    "    timestep_groups: 3",
    "    base_quantizer: {name: static, observer: minmax}",
    "    base_quantizer: {name: brevitas, act_quant: 'os:system'}",
    "  - match: 're:(.|.)*Z'\n    a_bits: 8",
    "defaults: [1]",
    "&a [*a, *a]",
    "!!python/object/apply:os.system ['true']",
    "\t\x00",
)


def tamper_bytes(draw: Callable[[Any], Any], files: dict[str, bytes]) -> dict[str, bytes]:
    name = draw(st.sampled_from([TENSORS, RECIPE, PLAN]))
    content = bytearray(files[name])
    for _ in range(draw(st.integers(1, 3))):
        content[draw(st.integers(0, len(content) - 1))] ^= draw(st.integers(1, 255))
    return {**files, name: bytes(content)}


def tamper_plan(draw: Callable[[Any], Any], files: dict[str, bytes]) -> dict[str, bytes]:
    """A value anywhere in plan.json replaced, dropped or added (deeper places as likely as the top)."""

    def edit(node: Any) -> None:
        parent, key = None, None
        while isinstance(node, (dict, list)) and node and (parent is None or draw(st.integers(0, 3))):
            key = (
                draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
            )
            parent, node = node, node[key]
        operation = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if operation == "set":
            parent[key] = draw(JSON_VALUES)
        elif operation == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            parent.insert(key, draw(JSON_VALUES))

    return edit_plan(files, edit)


def tamper_tensors(draw: Callable[[Any], Any], files: dict[str, bytes]) -> dict[str, bytes]:
    """A tensor (a quantizer's or a coded weight's more often than the model's own) refilled,
    retyped, reshaped, renamed, dropped or copied."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        ours = sorted(key for key in tensors if key.startswith(("modiff/", "codes/")))
        key = draw(st.sampled_from(ours) | st.sampled_from(sorted(tensors)))
        value = tensors[key]
        operation = draw(st.sampled_from(["fill", "fill", "fill one", "dtype", "shape", "rename", "drop", "copy"]))
        if operation.startswith("fill") and value.numel():
            fill = draw(st.sampled_from(FILLS)) if value.is_floating_point() else draw(st.sampled_from([0, 1, 5, 255]))
            value = value.clone()
            target = value.view(-1)[draw(st.integers(0, value.numel() - 1))] if operation == "fill one" else value
            target.fill_(fill)
            tensors[key] = value
        elif operation == "dtype":
            tensors[key] = value.to(draw(st.sampled_from(DTYPES)))
        elif operation == "shape":
            tensors[key] = draw(
                st.sampled_from(
                    [
                        value.flatten(),
                        value.unsqueeze(0),
                        value.flatten()[:-1],
                        torch.cat([value.flatten()] * 2),
                        value.flatten()[:1].reshape(()),
                    ]
                )
            )
        elif operation in ("rename", "copy"):
            other = draw(st.sampled_from(sorted(tensors)))
            name = draw(
                st.sampled_from(
                    [
                        other,
                        other + "x",
                        key.replace(".0.", ".1."),
                        key.replace("delta", "raw"),
                        key.replace("codes/", "modiff/"),
                        key.rsplit("/", 1)[0] + "/" + other.rsplit("/", 1)[-1],
                    ]
                )
            )
            tensors[name] = tensors.pop(key) if operation == "rename" else value.clone()
        elif operation == "drop":
            del tensors[key]

    return edit_tensors(files, edit)


def tamper_recipe(draw: Callable[[Any], Any], files: dict[str, bytes]) -> dict[str, bytes]:
    lines = files[RECIPE].decode().splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    new = draw(st.sampled_from(RECIPE_LINES) | st.text(max_size=12))
    operation = draw(st.sampled_from(["replace", "insert", "delete"]))
    if operation == "delete":
        del lines[index]
    else:
        lines[index : index + (operation == "replace")] = [new]
    return {**files, RECIPE: "\n".join(lines).encode("utf-8", "surrogatepass")}


TAMPERINGS = {"bytes": tamper_bytes, "plan": tamper_plan, "tensors": tamper_tensors, "recipe": tamper_recipe}


@pytest.mark.slow
@settings(
    max_examples=settings.default.max_examples if LONG else 80,
    derandomize=not LONG,
    database=settings.default.database if LONG else None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_tampered_checkpoints_load_or_fail_cleanly(saved, float_model, inputs, tmp_path, data):
    """Whatever the edit: a LoadError within the time bound, the model unchanged; or a load, after
    which a checkpoint whose quantizer state alone was edited still computes finite values."""
    kind = data.draw(
        st.sampled_from(["tensors", "tensors", "tensors", "plan", "plan", "bytes", "recipe"]), label="kind"
    )
    files = TAMPERINGS[kind](data.draw, saved)
    model = copy.deepcopy(float_model)
    error = load_or_refuse(model, write(tmp_path / "case", files))
    event(f"{kind}: {'refused' if error else 'loaded'}")
    if error is None and kind == "tensors":
        before, after = load(saved[TENSORS]), load(files[TENSORS])
        changed = {
            key
            for key in before.keys() | after.keys()
            if key not in before or key not in after or not torch.equal(before[key], after[key])
        }
        if all(key.startswith("modiff/") for key in changed):
            assert first_steps_are_finite(model, inputs), sorted(changed)
