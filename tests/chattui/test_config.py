"""The TOML config file: values applied, each bad value reported with file and key, the theme written
back without disturbing the rest of the file."""

from __future__ import annotations

import pytest

from chattui.config import Config, load_config, set_value


def test_missing_file_gives_defaults_and_no_errors(tmp_path):
    config = load_config(tmp_path / "config.toml")
    assert config.errors == []
    assert (config.device, config.dtype, config.theme, config.model_folders) == ("auto", "auto", "textual-dark", [])


def test_good_values_are_applied(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        'default_model = "~/m"\ndevice = "cuda:1"\ndtype = "bfloat16"\ntheme = "nord"\n'
        'model_folders = ["/a", "/b"]\nexport_dir = "/tmp/x"\n'
    )
    config = load_config(path)
    assert config.errors == []
    assert (config.default_model, config.device, config.dtype, config.theme) == ("~/m", "cuda:1", "bfloat16", "nord")
    assert config.model_folders == ["/a", "/b"] and config.export_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('device = "gpu"', "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ('dtype = "int8"', "dtype: expected auto, float32, bfloat16 or float16, got 'int8'"),
        ("model_folders = \"/one\"", "model_folders: expected a list of folder paths (strings), got '/one'"),
        ("theme = 3", "theme: expected a non-empty string, got 3"),
        ("colour = 'red'", "colour: unknown key (known: default_model, device, dtype, theme, model_folders, "
                           "export_dir)"),
    ],
)
def test_bad_value_is_reported_with_file_and_key_and_left_at_its_default(tmp_path, line, expected):
    path = tmp_path / "config.toml"
    path.write_text(f'{line}\ndtype = "float32"\n' if not line.startswith("dtype") else line + "\n")
    config = load_config(path)
    assert config.errors == [f"{path}: {expected}"]
    assert config.device == "auto" and config.theme == "textual-dark"


def test_invalid_toml_is_one_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('device = "cpu"\ntheme = \n')
    config = load_config(path)
    assert len(config.errors) == 1
    assert config.errors[0].startswith(f"{path}: invalid TOML (") and "line 2" in config.errors[0]
    assert config.device == "auto"


def test_set_value_replaces_only_its_line_and_keeps_comments(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('# my settings\ntheme = "nord"  # dark\ndevice = "cpu"\n\n[later]\ntheme = "x"\n')
    set_value(path, "theme", "gruvbox")
    assert path.read_text() == '# my settings\ntheme = "gruvbox"\ndevice = "cpu"\n\n[later]\ntheme = "x"\n'


def test_set_value_creates_a_commented_file(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    set_value(path, "theme", "nord")
    config = load_config(path)
    assert config.theme == "nord" and config.errors == []
    assert "# chattui configuration" in path.read_text()


def test_set_value_never_rewrites_a_broken_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("device = \n")
    with pytest.raises(ValueError):
        set_value(path, "theme", "nord")
    assert path.read_text() == "device = \n"
    Config(path=path).save_theme("nord")  # the app's path: logged, not raised
    assert path.read_text() == "device = \n"
