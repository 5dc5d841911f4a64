"""Hostile inputs that used to end in a traceback: each is one line naming the input, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import parse_stage

from posttrain.generation.generate import load_model
from posttrain.outputs.errors import PosttrainError, run_cli


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "is a directory; pass a .yaml file"),
        (b"learning_rate: 1e-3\n# caf\xe9\n", "not UTF-8 text"),
        (b"per_device_train_batch_size: [2]\n", "per_device_train_batch_size takes int, not a list ([2])"),
        (b"num_train_epochs: {a: 1}\n", "num_train_epochs takes float, not a mapping"),
    ],
    ids=["directory", "not_utf8", "list_for_int", "mapping_for_float"],
)
def test_recipe_faults_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.mkdir() if text is None else recipe.write_bytes(text)
    with pytest.raises(PosttrainError) as err:
        parse_stage("sft", recipe)
    assert message in str(err.value) and str(recipe) in str(err.value)


def test_a_first_argument_that_is_not_a_recipe_is_refused(tmp_path):
    with pytest.raises(PosttrainError, match="the first argument must be a recipe .yaml file"):
        parse_stage("sft", tmp_path)  # TRL would ignore it and train on its defaults


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # stopped by Jinja's sandbox
        "{% for m in messages %}{{ m.content ",  # does not parse
        "{{ raise_exception('no') }}",  # raises
    ],
    ids=["sandbox", "syntax", "raises"],
)
def test_a_chat_template_that_cannot_render_is_one_line(tmp_path, tiny_model_dir, template):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(template)
    with pytest.raises(PosttrainError) as err:
        load_model(model, device="cpu")
    assert str(err.value).startswith(f"{model}: its chat template cannot render a conversation (")


def test_weights_that_do_not_fit_the_config_architecture_are_refused(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertLMHeadModel"], is_decoder=True)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(PosttrainError, match="its weights lack .* tensors"):
        load_model(model, device="cpu")  # transformers would start them from random values


def test_a_template_error_nowhere_checked_is_still_one_line(capsys):
    from jinja2.exceptions import SecurityError

    def main():
        raise SecurityError("access to attribute '__class__' of 'str' object is unsafe.")

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "error: a chat template cannot render a conversation "
        "(SecurityError: access to attribute '__class__' of 'str' object is unsafe.)\n"
    )
