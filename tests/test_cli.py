from typer.testing import CliRunner

from cluster.cli import app

runner = CliRunner()


def test_help_explains_every_run_option():
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--config", "--engine", "--simulate", "--address", "--out", "--seed"):
        assert opt in res.output


def test_tracks_lists_e0():
    res = runner.invoke(app, ["tracks"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "e0" in res.output and "reproduce" in res.output


def test_doctor_says_which_engines_run_here():
    res = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "engine reference" in res.output and "engine vllm" in res.output


def test_bad_config_names_field_and_exits_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("engine: {max_batch_size: 0}\n")
    res = runner.invoke(app, ["run", "e0", "-c", str(p), "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "engine.max_batch_size" in res.output


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "not a pdbench run folder" in res.output


def test_vllm_refused_where_missing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:  # a GPU node: the refusal does not apply
        return
    res = runner.invoke(app, ["run", "e0", "--engine", "vllm", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "engine.kind" in res.output and "vllm" in res.output
