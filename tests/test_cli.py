from jpsdxl.cli import main


def test_profiles_lists_all(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tiny", "full", "full-random"))


def test_bad_profile_is_a_clear_error(capsys):
    assert main(["run", "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No profile 'nope'") and "tiny" in err


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    assert '"torch"' in capsys.readouterr().out
