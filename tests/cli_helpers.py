"""Shared check of the evaluation/report tests: a user error ends the CLI cleanly."""


def assert_one_error_line(capsys, rc, words):
    """Exit status 2, no traceback, exactly one ``gqa-prune: error:`` line, last, with ``words``."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("gqa-prune: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert words in errors[0], err
