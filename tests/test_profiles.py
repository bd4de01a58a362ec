import pytest

from jpsdxl.core.profiles import available_profiles, load_profile


def test_shipped_profiles_load():
    assert {"tiny", "full", "full-random"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.name == name and p.models.base and p.models.refiner


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


def _write(tmp_path, body, name="p.toml"):
    path = tmp_path / name
    path.write_text('description = "x"\n' + body)
    return path


MODELS = '[models]\nbase = "zoo:tiny/base"\nrefiner = "zoo:tiny/refiner"\n'


@pytest.mark.parametrize("body, message", [
    ('[models]\nbase = "zoo:tiny/base"\n', r"\[?models\]? needs 'refiner'"),
    ('models = "oops"\n', "models must be a table"),
    (MODELS + '[tokenizer]\nvocab_size = "8000"\n', r"tokenizer.vocab_size = '8000' is not of type int"),
    ('seed = "zero"\n' + MODELS, r"seed = 'zero' is not of type int"),
    ('dtype = "float33"\n' + MODELS, "dtype = 'float33': use one of float32, float16, bfloat16"),
    ('device = "gpu"\n' + MODELS, "device = 'gpu': use cpu, cuda"),
    ('name = "../../escaped"\n' + MODELS, "name = '../../escaped': a profile name becomes a folder"),
    (MODELS + '[data]\nvalid_fraction = 1.5\n', "valid_fraction = 1.5"),
    (MODELS + '[generate]\nsteps = 0\n', "generate.steps = 0: must be at least 1"),
    (MODELS + '[distill]\ncompare_eval_pairs = 0\n', "distill.compare_eval_pairs = 0: must be at least 2"),
    (MODELS + '[distill]\ncompare_steps = 0\n', "distill.compare_steps = 0: must be at least 1"),
    (MODELS + '[generate]\nhigh_noise_frac = 1.0\n', "high_noise_frac = 1.0: the hand-off point"),  # as --high-noise-frac
    ('seed = \n', "not valid TOML"),
])
def test_bad_profiles_name_the_file_and_key(tmp_path, body, message):
    from jpsdxl.core.profiles import ProfileError

    path = _write(tmp_path, body)
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_relative_paths_in_a_profile_are_read_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "pairs.tsv").write_text("猫\tcat\n")
    path = _write(tmp_path / "my", MODELS + '[data]\npairs = "pairs.tsv"\n')
    monkeypatch.chdir("/")
    p = load_profile(path)
    assert p.data.pairs == str(tmp_path / "my" / "pairs.tsv") and p.models.base == "zoo:tiny/base"
    assert p.source == str(path)


@pytest.mark.parametrize("body, message", [
    (MODELS + '[init]\nstrategy = "nearest"\n', "init.strategy = 'nearest': use one of similarity, topk"),
    (MODELS + '[distill]\ninit = "nearest"\n', "distill.init = 'nearest': use one of similarity, topk"),
    (MODELS + '[distill]\nschedule = "step"\n', "distill.schedule = 'step': use one of cosine, linear, constant"),
    (MODELS + '[init]\ncandidates = "kanji"\n', "init.candidates = 'kanji': use one of all, latin_words"),
    (MODELS + '[data]\npairs = "tatoeba"\nstreaming = true\n', "data.streaming = True: only an hf: source streams"),
])
def test_choices_come_from_one_declaration(tmp_path, body, message):
    """The allowed values are the config types' Literal members, and the stages read the same ones."""
    import typing

    from jpsdxl import embedding_init
    from jpsdxl.core.profiles import ProfileError, Strategy

    with pytest.raises(ProfileError, match=message):
        load_profile(_write(tmp_path, body))
    assert embedding_init.STRATEGIES == typing.get_args(Strategy)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_learning_rate_must_be_a_finite_number(tmp_path, value):
    from jpsdxl.core.profiles import ProfileError

    with pytest.raises(ProfileError, match=rf"distill.lr = {value.lstrip('-')}|distill.lr = -{value.lstrip('-')}"):
        load_profile(_write(tmp_path, MODELS + f"[distill]\nlr = {value}\n"))


def test_a_profile_that_is_not_a_name_is_one_clear_error():
    """papermill -p profile 3 passes the number 3."""
    from jpsdxl.core.profiles import ProfileError

    with pytest.raises(ProfileError, match=r"profile = 3 \(int\): give a profile's name in quotes"):
        load_profile(3)
