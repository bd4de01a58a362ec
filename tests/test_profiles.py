import pytest

from jpsdxl.profiles import available_profiles, load_profile


def test_shipped_profiles_load():
    assert {"tiny", "full", "full-random"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.name == name and p.models.base and p.models.refiner
        assert p.tokenizer.max_length == 77


def test_tiny_is_offline_and_cpu(tiny):
    assert tiny.models.base.startswith("zoo:") and tiny.device == "cpu"
    assert str(tiny.torch_device()) == "cpu"


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[models]\nbase = "a/b"\nrefiner = "c/d"\n[generate]\nstepz = 3\n')
    with pytest.raises(ValueError, match="stepz"):
        load_profile(bad)


def test_unknown_profile_lists_choices():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_profile("nope")


def test_profile_from_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\n[models]\nbase = "zoo:tiny/base"\nrefiner = "zoo:tiny/refiner"\n'
                    '[generate]\nsteps = 3\n')
    p = load_profile(path)
    assert p.name == "mine" and p.generate.steps == 3 and p.generate.height == 1024  # defaults fill the rest
