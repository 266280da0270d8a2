"""Recipe schema, overrides and the bad-input contract: exit 2, file:line, no traceback."""

from __future__ import annotations

import textwrap

import pytest

from conftest import ftkit
from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return p


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return p


def test_defaults_are_complete():
    r = Recipe()
    assert r.stage == "sft" and r.model.name == "smollm2-135m-instruct" and r.method.type == "lora"
    assert r.model.dtype == "auto" and r.data.train_on == "responses" and r.model.trust_remote_code is False


def test_overrides_are_typed(tmp_path, data_file):
    p = _write(tmp_path, f"data:\n  train: {data_file}\n")
    r = load_recipe(p, ["train.epochs=1", "method.r=8", "data.packing=true", "method.target_modules=[q_proj]"])
    assert r.train.epochs == 1.0 and r.method.r == 8 and r.data.packing is True
    assert r.method.target_modules == ["q_proj"]


def test_resolved_recipe_round_trips(tmp_path, data_file):
    p = _write(tmp_path, f"data:\n  train: {data_file}\ntrain:\n  learning_rate: 1.0e-3\n")
    r = load_recipe(p)
    again = load_recipe(_write(tmp_path, r.to_yaml(), "resolved.yaml"))
    assert again.model_dump() == r.model_dump()


def test_every_shipped_recipe_round_trips_through_its_resolved_form(tmp_path):
    """The recipe.yaml a run writes must load again, for every method and stage we ship."""
    from conftest import REPO

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name.startswith("pipeline"):
            continue
        r = load_recipe(path)
        again = load_recipe(_write(tmp_path, r.to_yaml(), f"resolved-{path.name}"))
        assert again.model_dump() == r.model_dump(), path


def test_unknown_key_suggests_and_names_line(tmp_path, data_file):
    p = _write(tmp_path, f"""
        data:
          train: {data_file}
        train:
          epochs: 1
          lerning_rate: 0.1
        """)
    with pytest.raises(UserError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert f"{p}:5" in msg and "train.lerning_rate" in msg and "did you mean 'train.learning_rate'" in msg


# (recipe text, --set items, substrings the message must contain)
BAD = [
    ("metod:\n  r: 8\n", [], [":1", "unknown key 'metod'", "did you mean 'method'"]),
    ("method:\n  type: lora\n  rank: 8\n", [], [":3", "method.rank"]),
    ("method:\n  r: -4\n", [], [":2", "method.r", "greater than 0"]),
    ("method:\n  r: eight\n", [], [":2", "method.r", "'eight'"]),
    ("method:\n  type: lorax\n", [], [":2", "method.type", "lora"]),
    ("stage: sftt\n", [], [":1", "stage"]),
    ("train:\n  learning_rate: fast\n", [], [":2", "train.learning_rate"]),
    ("train:\n  batch_size: 0\n", [], [":2", "train.batch_size"]),
    ("train:\n  lr_scheduler: cosinus\n", [], [":2", "unknown scheduler"]),
    ("data:\n  eval_split: 1.5\n", [], [":2", "data.eval_split"]),
    ("data:\n  format: alpacca\n", [], [":2", "data.format"]),
    ("model:\n  dtype: fp8\n", [], [":2", "model.dtype"]),
    ("model: [a, b]\n", [], [":1", "model"]),
    ("train:\n  epochs: 1\n    bad: indent\n", [], [":3", "not valid YAML"]),
    ("- just\n- a list\n", [], [":1", "mapping of sections"]),
    ("train:\n  epochs: 1\n", ["train.epochs=zero"], ["--set train.epochs=zero", "train.epochs"]),
    ("train:\n  epochs: 1\n", ["nonsense"], ["--set 'nonsense'", "key.path=value"]),
    ("data:\n  train: does/not/exist.jsonl\n", [], [":2", "data.train", "file not found"]),
    ("model:\n  name: ./no/such/model\n", [], [":2", "model.name", "not found"]),
]


@pytest.mark.parametrize("text,sets,needles", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipe_cli_contract(tmp_path, data_file, text, sets, needles):
    if "data:" not in text and "- just" not in text and "model: [" not in text:
        text += f"data:\n  train: {data_file}\n"
    p = _write(tmp_path, text)
    args = ["validate", str(p)]
    for s in sets:
        args += ["--set", s]
    res = ftkit(*args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    flat = " ".join(res.stderr.split())
    for needle in needles:
        assert needle.replace(":", f"{p}:", 1) in flat if needle.startswith(":") else needle in flat, (needle, flat)


# (recipe text, --set items, what the message says): pydantic's wording never reaches the user.
WORDING = [
    ("train:\n  batch_size: foo\n", [], ":2: train.batch_size: must be 'auto' or a whole number (got 'foo')"),
    ("train:\n  batch_size: 0\n", [], ":2: train.batch_size: must be 'auto' or greater than 0 (got 0)"),
    ("model: smollm2\n", [], ":1: model: is a section of keys (name, dtype"),
    ("model: smollm2\n", [], "did you mean model.name: smollm2?"),
    ("train:\n", [], ":1: train: is empty; give it keys (epochs,"),
    ("learning_rate: 0.001\n", [], ":1: unknown key 'learning_rate'; did you mean 'train.learning_rate'?"),
    ("beta: 0.2\n", [], "did you mean 'preference.beta' or 'rl.beta'?"),
    ("train:\n  lr: 0.001\n", [], ":2: unknown key 'train.lr'; did you mean 'train.learning_rate'?"),
    ("train:\n  num_train_epochs: 2\n", [], "num_train_epochs (LLaMA-Factory) is train.epochs in ftkit"),
    ("{}\n", ["train.lr=1e-4"], "--set train.lr=1e-4: unknown key 'train.lr'; did you mean 'train.learning_rate'?"),
    ("{}\n", ["learning_rate=1e-4"], "--set learning_rate=1e-4: unknown key 'learning_rate'; did you mean 'train.learning_rate'?"),
    ("{}\n", ["train.batch_size=x"], "--set train.batch_size=x: train.batch_size: must be 'auto' or a whole number"),
    ("stage: sftt\n", [], ":1: stage: must be one of: 'sft', 'pt', 'rm', 'dpo', 'kto', 'orpo', 'cpo' or 'rl' (got 'sftt'); did you mean 'sft'?"),
    ("method:\n  target_modules: 5\n", [], ":2: method.target_modules: must be 'auto' or 'all-linear' or a list (got 5)"),
    ("train:\n  max_steps: 2.5\n", [], ":2: train.max_steps: must be a whole number (got 2.5)"),
    ("model:\n  trust_remote_code: maybe\n", [], ":2: model.trust_remote_code: must be true or false (got 'maybe')"),
    ("data:\n  columns: [a]\n", [], ":2: data.columns: must be a mapping of keys to values (got ['a'])"),
    ("rl:\n  rewards:\n    - type: length\n      target_char: 5\n", [],
     ":4: unknown key 'rl.rewards.0.target_char'; did you mean 'rl.rewards.0.target_chars'?"),
]


@pytest.mark.parametrize("text,sets,needle", WORDING, ids=[f"words{i}" for i in range(len(WORDING))])
def test_errors_are_in_the_recipes_words(tmp_path, text, sets, needle):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        load_recipe(p, sets)
    msg = str(exc.value)
    assert (needle.replace(":", f"{p}:", 1) if needle.startswith(":") else needle) in msg, msg
    for jargon in ("Input should", "literal[", "constrained-", "Section", "valid dictionary"):
        assert jargon not in msg, msg


def test_missing_recipe_and_bad_args(tmp_path):
    res = ftkit("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "recipe not found" in res.stderr and "Traceback" not in res.stderr
    res = ftkit("sft")  # missing argument: click's usage error, also exit 2
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_validate_does_not_import_torch(tmp_path, data_file):
    import subprocess
    import sys

    p = _write(tmp_path, f"data:\n  train: {data_file}\n")
    code = (
        "import sys; from ftkit.cli import app\n"
        f"try:\n    app(['validate', {str(p)!r}])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_stage_mismatch_is_bad_input(tmp_path, data_file):
    p = _write(tmp_path, f"stage: pt\ndata:\n  train: {data_file}\n")
    res = ftkit("sft", str(p))
    assert res.returncode == 2 and f"{p}:1" in res.stderr and "ftkit pt" in res.stderr


def test_validate_accepts_a_pipeline_file():
    from conftest import REPO

    res = ftkit("validate", str(REPO / "recipes" / "pipeline-rlhf.yaml"), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "3 stages validated" in " ".join(res.stdout.split())


def test_every_shipped_recipe_validates():
    from conftest import REPO

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        res = ftkit("validate", str(path), cwd=REPO)
        assert res.returncode == 0, (path, res.stderr)
