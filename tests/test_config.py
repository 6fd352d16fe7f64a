import pytest

from kfold.config import ConfigError, Recipe, build_recipe, from_dict, parse_opts, parse_value, set_key, to_dict


def test_full_preset_is_the_reference_recipe():
    r = build_recipe({}, "full")
    assert (r.model.arch, r.model.encoder, r.model.encoder_weights) == ("fpn", "tu-convnext_base", "imagenet")
    assert r.data.input_size == (720, 960) and r.data.crop_size == (576, 768)
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay) == ("adamw", 1e-4, 1e-4)
    assert (r.schedule.epochs, r.train.batch_size, r.train.ema_decay) == (50, 4, 0.999)
    assert (r.loss.depth_loss, r.loss.depth_weight) == ("l1", 0.1)
    assert r.tta.scales == (0.5, 0.75, 1.0, 1.25, 1.5) and r.tta.hflip


def test_opts_are_parsed_and_type_checked():
    r = build_recipe({}, "smoke", parse_opts(["optim.lr", "3e-4", "tta.scales", "[0.5, 1]", "optim.grad_clip", "null"]))
    assert r.optim.lr == 3e-4 and r.tta.scales == (0.5, 1.0) and r.optim.grad_clip is None
    set_key(r, "data.input_size", [64, 64])
    assert r.data.input_size == (64, 64)
    with pytest.raises(ConfigError, match="schedule.epochs: expected int"):
        set_key(r, "schedule.epochs", "ten")
    with pytest.raises(ConfigError, match="expected a list of 2"):
        set_key(r, "data.input_size", [1, 2, 3])
    with pytest.raises(ConfigError, match="true or false"):
        set_key(r, "tta.hflip", 1)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        build_recipe({}, "full", {"optim.lrr": 1})
    assert "optim.lr" in str(err.value) and "\n" not in str(err.value)


def test_values_are_never_evaluated():
    assert parse_value("__import__('os').system('true')") == "__import__('os').system('true')"
    with pytest.raises(ConfigError):
        set_key(Recipe(), "optim.lr", parse_value("__import__('os')"))


def test_round_trip_through_dict():
    r = build_recipe({"data.in_channels": 4, "loss.class_weights": {"tv": 1.5}}, "demo")
    assert from_dict(to_dict(r)) == r


def test_unknown_preset_and_odd_opts():
    with pytest.raises(ConfigError, match="preset"):
        build_recipe({}, "huge")
    with pytest.raises(ConfigError, match="no value"):
        parse_opts(["optim.lr"])


def test_distill_keys_are_checked_up_front():
    from kfold.validate import validate_recipe

    assert validate_recipe(build_recipe({"distill.teacher": "blend_1"}, "smoke")).distill.alpha == 1.0
    bad = {"distill.alpha": -1, "distill.temperature": 0, "distill.min_confidence": 1.0,
           "distill.teacher": "../x"}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_recipe(build_recipe({"distill.teacher": "b", key: value}, "smoke"))
    with pytest.raises(ConfigError, match="distill.pseudo_test"):
        validate_recipe(build_recipe({"distill.pseudo_test": True}, "smoke"))
    with pytest.raises(ConfigError, match="data.streaming"):
        validate_recipe(build_recipe({"distill.teacher": "b", "data.streaming": True}, "smoke"))


def test_a_fold_recorded_before_a_key_existed_ran_with_its_default(tmp_path):
    import yaml

    from kfold.rundir import recipe_differences

    recipe = build_recipe({}, "smoke")
    old = to_dict(recipe)
    del old["distill"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"recipe": old}))
    assert recipe_differences(tmp_path, recipe) == []
    recipe.distill.teacher = "b"
    assert recipe_differences(tmp_path, recipe) == ["distill.teacher"]
