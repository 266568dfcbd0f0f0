import pytest

from tunelab.config import describe_fields, parse_override, resolve_config
from tunelab.errors import ConfigError


def test_defaults_train_the_embedded_default():
    c = resolve_config()
    assert c.model.name == "minilm" and c.method.name == "full" and c.task.name == "classification"
    assert c.data.train is None  # packaged demo


def test_overrides_are_typed_yaml_scalars():
    c = resolve_config(overrides=["train.lr=3e-4", "train.batch_size=16",
                                  "train.gradient_checkpointing=true", "data.labels=[neg, pos]"])
    assert c.train.lr == pytest.approx(3e-4) and isinstance(c.train.lr, float)
    assert c.train.batch_size == 16 and c.train.gradient_checkpointing is True
    assert c.data.labels == ["neg", "pos"]


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: /some/dir\nmethod:\n  name: lora\n  r: 4\n"
                      "train:\n  epochs: 2\n")
    c = resolve_config(recipe, ["method.r=16", "train.epochs=1"])
    assert c.model.name == "/some/dir"
    assert c.method.name == "lora" and c.method.settings.r == 16
    assert c.train.epochs == 1.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=["train.learning_rate=1e-3"])
    assert "train.learning_rate" in str(e.value) and "lr" in str(e.value)
    assert "batch_size" in str(e.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="valid keys: task, model, data, method, train"):
        resolve_config(tree={"trian": {}})


def test_unknown_method_setting_and_method():
    with pytest.raises(ConfigError, match="method.rank"):
        resolve_config(overrides=["method.name=lora", "method.rank=8"])
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*full"):
        resolve_config(overrides=["method.name=lorra"])


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=abc", "train.batch_size must be int"),
    ("train.batch_size=0", "batch_size must be positive"),
    ("train.precision=fp16", "precision must be one of"),
    ("data.validation_ratio=1.5", "validation_ratio"),
    ("task=summarize", "unknown task .summarize.; valid tasks"),
    ("train.lr", "must look like key.sub=value"),
])
def test_invalid_values(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=[override])


def test_bad_yaml_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")


def test_round_trip_and_hash(tmp_path):
    from tunelab.config import save_config

    c = resolve_config(overrides=["method.name=lora", "method.r=4", "train.lr=1e-3"])
    save_config(c, tmp_path / "config.yaml")
    again = resolve_config(tmp_path / "config.yaml")
    assert again.to_dict() == c.to_dict()
    assert again.hash() == c.hash()
    assert resolve_config(overrides=["train.lr=2e-3"]).hash() != c.hash()


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    missing = [k for k, _, doc in rows if not doc]
    assert missing == []


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_task_accepts_a_name_or_a_mapping_and_rejects_unknown_ones():
    assert resolve_config(overrides=["task=classification"]).task.name == "classification"
    assert resolve_config(tree={"task": {"name": "classification"}}).task.name == "classification"
    with pytest.raises(ConfigError, match="unknown task 'regression'; valid tasks: .*classification"):
        resolve_config(overrides=["task=regression"])
    with pytest.raises(ConfigError, match="unknown key task.scheme"):
        resolve_config(tree={"task": {"name": "classification", "scheme": "BIO"}})


def test_metric_must_belong_to_the_task():
    from tunelab.tasks import get_task
    from tunelab.train.loop import check_metric

    task = get_task(resolve_config(overrides=["train.metric=perplexity"]))
    with pytest.raises(ConfigError, match="train.metric must be one of accuracy.* for task "
                                          "classification"):
        check_metric(task)
    assert get_task(resolve_config()).metric == "accuracy"


def test_task_shorthand_accepts_settings_after_it():
    c = resolve_config(overrides=["task=mlm", "task.whole_word_mask=true"])
    assert c.task.name == "mlm" and c.task.settings.whole_word_mask is True


def test_model_size_is_refused_by_tasks_that_need_a_pretrained_model():
    from tunelab.tasks import get_task

    with pytest.raises(ConfigError, match="model.size builds an untrained model, which task "
                                          "classification cannot start from"):
        get_task(resolve_config(overrides=["model.size=mini"]))
    assert get_task(resolve_config(overrides=["task=mlm", "model.size=mini"])).name == "mlm"
