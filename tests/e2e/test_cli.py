"""Config errors found inside a run, after Flower's simulation engine has started Ray: one line
naming the culprit, non-zero exit, nothing written."""

from tests.harness import run_cli


def test_a_model_that_fails_to_build_inside_the_run_writes_nothing(tmp_path, monkeypatch, capsys):
    import fedpeft.models
    from fedpeft.models import ModelError

    def build(*args, **kwargs):
        raise ModelError("model 'minilm': the weights could not be read")

    monkeypatch.setattr(fedpeft.models, "build", build)
    code, out, err = run_cli(["simulate", "clients=4", "rounds=1"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert [l for l in err.splitlines() if l.strip()] == ["fedpeft: error: model 'minilm': the weights could not be read"], err
    assert list(tmp_path.rglob("*")) == []
