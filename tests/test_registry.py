"""Tests of the name -> class registries: shipped base quantizers found through entry points,
helpful errors for unknown names, third-party plugins (lazy, and unable to break the package when
broken), and the registration decorators."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import pytest

import modiff_quant  # noqa: F401  (registers the shipped schemes and observers)
from modiff_quant.base_quantizer import BaseQuantizer
from modiff_quant.observers import Observer
from modiff_quant.registry import (
    BASE_QUANTIZERS,
    OBSERVERS,
    SCHEMES,
    Registry,
    UnknownNameError,
    register_base_quantizer,
    register_observer,
    register_scheme,
)
from modiff_quant.schemes import Scheme

GROUP = "modiff_quant.base_quantizers"


@pytest.fixture
def isolated_registries(monkeypatch):
    """Let a test register names in the global registries without leaking them to other tests."""
    for registry in (SCHEMES, BASE_QUANTIZERS, OBSERVERS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------
# shipped names


@pytest.mark.parametrize(
    "name,target",
    [
        ("dynamic", "modiff_quant.backends.dynamic:DynamicQuantizer"),
        ("static", "modiff_quant.backends.static:StaticQuantizer"),
    ],
)
def test_shipped_base_quantizers_resolve_through_entry_points(name, target):
    """`dynamic` and `static` are found via the entry points declared in pyproject.toml."""
    from importlib.metadata import entry_points

    (ep,) = entry_points(group=GROUP, name=name)
    assert ep.value == target
    module_name, attr = target.split(":")
    expected = getattr(importlib.import_module(module_name), attr)
    # A fresh registry knows nothing but its entry-point group, so this proves the entry point works.
    fresh = Registry("base quantizer", GROUP)
    assert name in fresh.names()
    assert fresh.get(name) is expected
    assert BASE_QUANTIZERS.get(name) is expected
    assert issubclass(expected, BaseQuantizer)


def test_shipped_backends_load_lazily_in_a_fresh_interpreter():
    """`import modiff_quant` imports no backend; the first lookup imports it via its entry point."""
    script = textwrap.dedent(
        """
        import sys
        import modiff_quant
        from modiff_quant.registry import BASE_QUANTIZERS
        assert "modiff_quant.backends.dynamic" not in sys.modules
        assert {"dynamic", "static"} <= set(BASE_QUANTIZERS.names())
        assert "modiff_quant.backends.dynamic" not in sys.modules
        cls = BASE_QUANTIZERS.get("dynamic")
        from modiff_quant.backends.dynamic import DynamicQuantizer
        assert cls is DynamicQuantizer
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_builtin_schemes_and_observers_are_registered():
    """`modiff`/`plain` schemes and the three observers are available after `import modiff_quant`."""
    assert {"modiff", "plain"} <= set(SCHEMES.names())
    assert {"minmax", "ema_minmax", "mse"} <= set(OBSERVERS.names())
    for name in ("modiff", "plain"):
        assert issubclass(SCHEMES.get(name), Scheme)
    for name in ("minmax", "ema_minmax", "mse"):
        assert issubclass(OBSERVERS.get(name), Observer)


# ---------------------------------------------------------------------------------------------
# unknown names


@pytest.mark.parametrize(
    "registry,typo,suggestion",
    [
        (BASE_QUANTIZERS, "dynamc", "dynamic"),
        (BASE_QUANTIZERS, "statc", "static"),
        (SCHEMES, "modif", "modiff"),
        (SCHEMES, "plian", "plain"),
        (OBSERVERS, "minmx", "minmax"),
        (OBSERVERS, "ema_minmx", "ema_minmax"),
        (OBSERVERS, "mes", "mse"),
    ],
)
def test_unknown_name_suggests_nearest(registry, typo, suggestion):
    """A misspelt name raises UnknownNameError (a KeyError) that says what was probably meant."""
    with pytest.raises(UnknownNameError) as info:
        registry.get(typo)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert repr(typo) in message
    assert f"did you mean {suggestion!r}" in message or f"or {suggestion!r}" in message
    assert registry.kind in message
    assert "known:" in message
    assert typo not in registry


@pytest.mark.parametrize("registry", [BASE_QUANTIZERS, SCHEMES, OBSERVERS])
def test_unknown_name_without_close_match_lists_known_names(registry):
    """A name close to nothing gives no guess but still lists every known name."""
    with pytest.raises(KeyError) as info:
        registry.get("zzzzzzzzzz")
    message = str(info.value)
    assert "did you mean" not in message
    assert not message.startswith("'")  # not KeyError's quoted repr
    for name in registry.names():
        assert name in message


# ---------------------------------------------------------------------------------------------
# third-party plugins


def write_fake_distribution(root: Path, entries: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution: dist-info with METADATA and entry_points.txt, plus modules."""
    info = root / "fakeplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    lines = [f"[{GROUP}]"] + [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


GOOD_PLUGIN = """
    from modiff_quant.base_quantizer import BaseQuantizer, DynamicActivationQuantizer
    from modiff_quant.quant import quantize_minmax

    class FakeQuantizer(BaseQuantizer):
        def quantize_weight(self, weight, spec):
            return quantize_minmax(weight, spec, weight=True)

        def activation_quantizer(self, spec, channel_dim):
            return DynamicActivationQuantizer(spec, channel_dim)
"""

BROKEN_PLUGIN = """
    raise ImportError("fakeplugin needs a library that is not installed")
"""


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch, isolated_registries):
    """A fake installed distribution with one working and one broken base-quantizer plugin."""
    suffix = uuid.uuid4().hex[:10]
    good, broken = f"fakeq_{suffix}", f"brokenq_{suffix}"
    good_module, broken_module = f"fakeplugin_good_{suffix}", f"fakeplugin_broken_{suffix}"
    write_fake_distribution(
        tmp_path,
        {good: f"{good_module}:FakeQuantizer", broken: f"{broken_module}:Anything"},
        {good_module: GOOD_PLUGIN, broken_module: BROKEN_PLUGIN},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {
        "good": good,
        "broken": broken,
        "good_module": good_module,
        "broken_module": broken_module,
        "path": tmp_path,
    }
    for module in (good_module, broken_module):
        sys.modules.pop(module, None)


def test_plugin_listed_without_import_and_found_by_name(fake_plugin):
    """A plugin's entry point is listed by names() without importing it, and loaded on first get()."""
    registry = Registry("base quantizer", GROUP)
    names = registry.names()
    assert fake_plugin["good"] in names and fake_plugin["broken"] in names
    assert {"dynamic", "static"} <= set(names)
    assert fake_plugin["good"] in BASE_QUANTIZERS.names()
    assert fake_plugin["good_module"] not in sys.modules
    assert fake_plugin["broken_module"] not in sys.modules

    cls = registry.get(fake_plugin["good"])
    assert cls.__name__ == "FakeQuantizer" and issubclass(cls, BaseQuantizer)
    assert sys.modules[fake_plugin["good_module"]].FakeQuantizer is cls
    assert fake_plugin["broken_module"] not in sys.modules  # loading one plugin loads no other
    assert BASE_QUANTIZERS.get(fake_plugin["good"]) is cls  # the global registry finds it too


def test_broken_plugin_warns_then_unknown_name(fake_plugin):
    """A plugin failing at import gives a RuntimeWarning naming it, then UnknownNameError; nothing else breaks."""
    registry = Registry("base quantizer", GROUP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnknownNameError) as info:
            registry.get(fake_plugin["broken"])
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    text = str(runtime[0].message)
    assert repr(fake_plugin["broken"]) in text
    assert fake_plugin["broken_module"] in text
    assert "ImportError" in text
    assert runtime[0].filename == __file__  # attributed to the caller, not to registry.py
    assert repr(fake_plugin["broken"]) in str(info.value)

    # other lookups keep working, in the fresh and the global registry
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get(fake_plugin["good"]).__name__ == "FakeQuantizer"
        assert registry.get("dynamic") is BASE_QUANTIZERS.get("dynamic")
        assert BASE_QUANTIZERS.get("static").__name__ == "StaticQuantizer"
    with pytest.warns(RuntimeWarning, match=fake_plugin["broken"]):
        assert fake_plugin["broken"] not in BASE_QUANTIZERS


def test_broken_plugin_cannot_break_import_in_fresh_interpreter(fake_plugin):
    """With a broken plugin installed, `import modiff_quant` and shipped lookups still work."""
    script = textwrap.dedent(
        f"""
        import sys, warnings
        import modiff_quant
        from modiff_quant.registry import BASE_QUANTIZERS, UnknownNameError
        assert {fake_plugin["broken"]!r} in BASE_QUANTIZERS.names()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                BASE_QUANTIZERS.get({fake_plugin["broken"]!r})
            except UnknownNameError:
                pass
            else:
                raise AssertionError("broken plugin resolved")
        assert any(
            issubclass(w.category, RuntimeWarning) and {fake_plugin["broken"]!r} in str(w.message) for w in caught
        )
        assert BASE_QUANTIZERS.get("dynamic").__name__ == "DynamicQuantizer"
        assert BASE_QUANTIZERS.get({fake_plugin["good"]!r}).__name__ == "FakeQuantizer"
        print("ok")
        """
    )
    env_path = str(fake_plugin["path"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([env_path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# decorators


@pytest.mark.parametrize(
    "decorator,registry",
    [(register_base_quantizer, BASE_QUANTIZERS), (register_observer, OBSERVERS), (register_scheme, SCHEMES)],
)
def test_decorators_register_classes(decorator, registry, isolated_registries):
    """Each decorator registers the class under its name and returns it unchanged."""
    name = unique("plugin")

    class Thing:
        pass

    assert decorator(name)(Thing) is Thing
    assert registry.get(name) is Thing
    assert name in registry.names()
    assert name in registry


@pytest.mark.parametrize(
    "decorator,registry",
    [(register_base_quantizer, BASE_QUANTIZERS), (register_observer, OBSERVERS), (register_scheme, SCHEMES)],
)
def test_decorators_reject_a_taken_name_but_allow_reregistering(decorator, registry, isolated_registries):
    """A different object under a taken name is a ValueError; re-registering the same one is a no-op."""
    name = unique("plugin")

    class First:
        pass

    class Second:
        pass

    decorator(name)(First)
    decorator(name)(First)  # e.g. a module imported twice
    with pytest.raises(ValueError, match=name):
        decorator(name)(Second)
    assert registry.get(name) is First


@pytest.mark.parametrize(
    "decorator,taken",
    [(register_observer, "minmax"), (register_scheme, "modiff"), (register_base_quantizer, "dynamic")],
)
def test_decorators_cannot_replace_builtin_names(decorator, taken, isolated_registries):
    """Shipped names cannot be silently replaced by a plugin."""
    OBSERVERS.get("minmax"), SCHEMES.get("modiff"), BASE_QUANTIZERS.get("dynamic")  # make sure they are loaded

    class Impostor:
        pass

    with pytest.raises(ValueError):
        decorator(taken)(Impostor)


def test_registering_an_entry_point_name_before_it_is_loaded_is_rejected():
    """A name declared by an entry point is taken even before its module is imported; otherwise a
    decorator silently shadows the shipped `static` and importing the real backend later fails."""
    script = textwrap.dedent(
        """
        from modiff_quant.registry import BASE_QUANTIZERS, register_base_quantizer
        try:
            @register_base_quantizer("static")
            class Impostor:
                pass
        except ValueError:
            print("rejected")
        else:
            print("shadowed:", BASE_QUANTIZERS.get("static").__name__)
            try:
                import modiff_quant.backends.static
            except ValueError as exc:
                print("then importing the shipped backend fails:", exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rejected", result.stdout
