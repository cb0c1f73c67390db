"""Every key of the config schema rejects a bad value when the config is loaded: one line naming
the key and what it accepts (the choices, with the nearest one, for names), in under 5 s and
without Ray. The keys are found by walking the schema, so a new key is checked without editing
this file; a number without bounds or a word without its choices fails here.

(A value naming a registry entry is checked by importing the registry's module, torch and timm
among them: the first such check of a process pays that import once, see ``registries_loaded``.)"""

import sys
import time
import types
import typing
from typing import Annotated, Literal

import pytest

from pdso_ray.cli import main
from pdso_ray.config import Choices, ConfigError, FolderName, Range, Registry, load_config, schema_leaves

BASE = ["data.classes=5"]
# Free-form strings (paths, URLs, credentials): any string is a value; a mapping is not.
FREE_TEXT = {"output", "data.root", "data.class_list", "data.features", "models.dino.checkpoint",
             "models.sam.checkpoint", "storage.s3.endpoint_url", "storage.s3.key", "storage.s3.secret",
             "storage.s3.token", "ray.address", "tracking.mlflow_uri", "tracking.mlflow_experiment"}


def _strip_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1
        return args[0]
    return hint


def bad_value(key, hint):
    """``(override text, words the error must contain)`` for a value the schema must refuse."""
    hint = _strip_none(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        item = f"{key}[0]"
        text, needles = bad_value(item, args[0])
        return f"[{text}]", [item, *needles]
    if origin is Literal:
        choices = [str(a) for a in args]
        return choices[0] + "x", ["did you mean", *choices]
    if origin is Annotated:
        base, rules = args[0], args[1:]
        for rule in rules:
            if isinstance(rule, (Registry, Choices)):
                choices = rule.choices()
                return choices[0] + "x", ["did you mean", *choices]
            if isinstance(rule, Range):
                if rule.lo is not None:
                    value = rule.lo if rule.lo_open else rule.lo - (1 if base is int else 0.5)
                else:
                    value = rule.hi if rule.hi_open else rule.hi + 1
                return str(int(value) if base is int else value), ["must be", rule.describe()]
            if isinstance(rule, FolderName):
                return "a/b", ["one folder name"]
    if hint is bool:
        return "maybe", ["expected true or false"]
    if hint is str:
        return "{a: 1}", ["expected a string"]
    raise AssertionError(f"{key}: {hint} states no allowed values or bounds")


def test_every_key_is_walked_and_states_what_it_accepts():
    keys = dict(schema_leaves())
    assert {"data.layout", "models.dino.arch", "denoise.head_init", "denoise.relabel", "finetune.agmm_momentum",
            "features.batch_size", "stages", "pretrain.hue"} <= set(keys)
    for key, hint in keys.items():
        base = _strip_none(hint)
        if base is str and key not in FREE_TEXT:
            pytest.fail(f"{key} is a plain string: give it its choices (Literal or a Registry) or list it as free text")
        if base in (int, float):
            pytest.fail(f"{key} is a number without bounds: annotate it with a Range")
        bad_value(key, hint)  # raises when the schema says nothing about the key


@pytest.fixture(scope="module")
def registries_loaded():
    load_config(overrides=BASE)


@pytest.mark.parametrize("key, hint", schema_leaves(), ids=[k for k, _ in schema_leaves()])
def test_a_bad_value_is_one_error_line_naming_the_key(key, hint, capsys, tmp_path, registries_loaded):
    text, needles = bad_value(key, hint)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[*BASE, f"{key}={text}"])
    seconds = time.perf_counter() - started
    message = str(e.value)
    assert "\n" not in message and key in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert seconds < 5
    # The CLI prints exactly that line and exits 2, before any Ray start.
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {tmp_path / 'run'}\n")
    assert main(["run", str(config), "--set", BASE[0], "--set", f"{key}={text}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_the_methods_argument_guards_accept_what_the_config_does():
    """The pure method checks the settings it is called with (a library call bypasses the config);
    its lists of words are the config's, so the two cannot drift."""
    from pdso_ray.config import DenoiseConfig, PurifyConfig, RefineConfig, _field_types
    from pdso_ray.method import denoise, purify, refiners

    pairs = [(DenoiseConfig, "head", denoise.HEADS), (DenoiseConfig, "s2_labels", denoise.S2_LABELS),
             (DenoiseConfig, "h_rows", denoise.H_ROWS), (DenoiseConfig, "head_init", denoise.HEAD_INITS),
             (DenoiseConfig, "relabel", denoise.RELABELS), (DenoiseConfig, "prototypes", denoise.PROTOTYPES),
             (PurifyConfig, "kept_distance", purify.KEPT_DISTANCES),
             (RefineConfig, "spo_components", refiners.SPO_COMPONENTS),
             (RefineConfig, "select_fail", refiners.SELECT_FAIL_RULES)]
    for section, key, words in pairs:
        assert typing.get_args(_field_types(section)[key]) == tuple(words), key
