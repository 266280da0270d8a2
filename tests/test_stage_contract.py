"""The stage contract and the value lists, without training: every registered stage supplies what the
lifecycle calls, the CLI has one command per stage with the same options, errors map to exit codes in one
place, the CLI's choices come from the schema's lists, and activation_checkpointing: auto reads memory."""

from __future__ import annotations

import inspect
from pathlib import Path
import typing
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from ftkit.choices import CHAT_FORMATS, DATA_FORMATS, DTYPES, EVAL_METRICS, PREFERENCE_FORMATS
from ftkit.errors import FtkitError, GateFailed, UserError, VerificationFailed, exit_code_of
from ftkit.stages.registry import STAGES

CONTRACT = ("check", "build", "trainer_classes", "config_args", "summarize", "done_line")


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_module_supplies_the_contract(name):
    spec = STAGES[name]
    module = spec.load()
    missing = [f for f in CONTRACT if not callable(getattr(module, f, None))]
    assert not missing, f"{spec.module} lacks {missing}"
    assert spec.data_format is None or spec.data_format in PREFERENCE_FORMATS
    assert spec.headline and spec.help


def test_recipe_stages_and_cli_commands_come_from_the_registry():
    from ftkit.cli import app
    from ftkit.recipe import Recipe

    assert typing.get_args(Recipe.model_fields["stage"].annotation) == tuple(STAGES)
    commands = {c.name: c for c in app.registered_commands}
    options = None
    for name in STAGES:
        params = inspect.signature(commands[name].callback).parameters
        flags = {p.default.param_decls[0] for p in params.values() if hasattr(p.default, "param_decls")
                 and p.default.param_decls}
        assert options is None or flags == options, f"ftkit {name} has other options than the rest"
        options = flags
    assert {"--set", "--output", "--overwrite", "--resume", "--json", "--fail-if", "--num-processes",
            "--no-cache"} <= options


def test_errors_map_to_exit_codes_in_one_place():
    from ftkit.resume import Interrupted

    assert [exit_code_of(e) for e in (UserError("x"), GateFailed("x"), VerificationFailed("x"))] == [2, 3, 1]
    assert all(isinstance(e, FtkitError) for e in (UserError("x"), GateFailed("x"), VerificationFailed("x")))
    assert exit_code_of(KeyboardInterrupt()) == 130 and exit_code_of(Interrupted(3, Path("run"))) == 130
    assert exit_code_of(RuntimeError("bug")) == 1
    assert GateFailed.label == "gate failed"


def test_value_lists_agree_with_their_users():
    from ftkit.data.formats import CONVERTERS
    from ftkit.evaluate import METRICS
    from ftkit.merge import TOLERANCE
    from ftkit.recipe import DataSection, ModelSection

    assert set(TOLERANCE) == set(DTYPES) - {"auto"}
    assert set(CONVERTERS) == set(CHAT_FORMATS) | set(PREFERENCE_FORMATS)
    assert typing.get_args(DataSection.model_fields["format"].annotation) == DATA_FORMATS
    assert typing.get_args(ModelSection.model_fields["dtype"].annotation) == DTYPES
    assert tuple(METRICS) == EVAL_METRICS


def _models(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _models(inner, f"{prefix}{name}.")


def test_every_recipe_field_has_a_description():
    from ftkit.recipe import Recipe

    fields = list(_models(Recipe))
    assert len(fields) > 60
    missing = [name for name, field in fields if not field.description]
    assert not missing, f"fields without a description: {missing}"


def _hw(device: str):
    return SimpleNamespace(device=device, dtype="bfloat16", threads=1)


def _recipe(**train):
    from ftkit.recipe import Recipe

    r = Recipe()
    r.train.batch_size = 2
    r.data.max_length = 2048
    for k, v in train.items():
        setattr(r.train, k, v)
    return r


MODEL = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=32, hidden_size=4096, vocab_size=32000))


@pytest.mark.parametrize("free_gib, expected", [(8, True), (80, False)])
def test_activation_checkpointing_auto_decides_from_free_gpu_memory(monkeypatch, free_gib, expected):
    import torch

    from ftkit.stages.common import activation_bytes, use_activation_checkpointing

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free_gib * 2**30, 80 * 2**30))
    need = activation_bytes(MODEL.config, 2 * 2048, 2)
    assert 8 * 2**30 < 2 * need < 80 * 2**30, "the two cases straddle the threshold"
    assert use_activation_checkpointing(_recipe(), _hw("cuda"), MODEL) is expected


def test_activation_checkpointing_auto_is_off_on_cpu_and_explicit_values_win(monkeypatch):
    import torch

    from ftkit.stages.common import use_activation_checkpointing

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1, 1))
    assert use_activation_checkpointing(_recipe(), _hw("cpu"), MODEL) is False
    assert use_activation_checkpointing(_recipe(activation_checkpointing=True), _hw("cpu"), MODEL) is True
    assert use_activation_checkpointing(_recipe(activation_checkpointing=False), _hw("cuda"), MODEL) is False
