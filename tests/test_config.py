"""Configuration dataclasses: from_dict validation, merge, precedence of defaults < preset < file < overrides,
and read_yaml errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

import ssdd.config as config_mod
from ssdd.config import from_dict, list_presets, merge, read_yaml, resolve_config, to_dict
from ssdd.errors import ConfigError, SsddError


@dataclass
class Optim:
    lr: float = 0.1
    momentum: float = 0.9
    steps: int = 100


@dataclass
class Demo:
    name: str = "demo"
    epochs: int = 10
    batch: int = 32
    scale: float = 1.0
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    seed: int | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[float, float] = (0.5, 1.5)
    optim: Optim = field(default_factory=Optim)


def config_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    assert isinstance(excinfo.value, SsddError)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_from_dict_defaults_and_values() -> None:
    assert from_dict(Demo, {}) == Demo()
    cfg = from_dict(Demo, {"epochs": 3, "scale": 2, "flag": True, "mode": "slow", "seed": 7, "sizes": [4],
                           "pair": [0.1, 0.2], "name": "x"})
    assert cfg == Demo(name="x", epochs=3, scale=2.0, flag=True, mode="slow", seed=7, sizes=[4], pair=(0.1, 0.2))
    assert isinstance(cfg.scale, float) and isinstance(cfg.pair, tuple)


def test_from_dict_lossless_conversions() -> None:
    cfg = from_dict(Demo, {"epochs": 4.0, "scale": "1e-3"})
    assert cfg.epochs == 4 and isinstance(cfg.epochs, int)
    assert cfg.scale == pytest.approx(1e-3)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"epochs": 1, "epoch": 2, "zzz": 3})
    config_error(excinfo, "epoch", "zzz", "valid keys", "batch", "epochs", "optim", "scale")


def test_unknown_nested_key_names_the_path() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"optim": {"lr": 0.5, "nesterov": True}})
    config_error(excinfo, "optim", "nesterov", "lr", "momentum", "steps")


@pytest.mark.parametrize("key,value,word", [
    ("epochs", "ten", "integer"),
    ("epochs", "10", "integer"),
    ("epochs", 2.5, "integer"),
    ("epochs", True, "integer"),
    ("scale", "big", "number"),
    ("scale", [1.0], "number"),
    ("flag", "yes", "true/false"),
    ("flag", 1, "true/false"),
    ("name", 5, "string"),
    ("mode", "medium", "fast"),
    ("sizes", 3, "list"),
    ("optim", 3, "mapping"),
])
def test_wrong_types_are_clear_config_errors(key: str, value: object, word: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {key: value})
    config_error(excinfo, key, word, repr(value))


def test_wrong_type_inside_list_and_nested() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"sizes": [1, "two"]})
    config_error(excinfo, "sizes[1]", "'two'")
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"optim": {"steps": "many"}})
    config_error(excinfo, "optim.steps", "'many'")


def test_fixed_length_tuple_checks_its_length() -> None:
    # ``pair: tuple[float, float]`` holds exactly two numbers.
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"pair": [0.1, 0.2, 0.3]})
    config_error(excinfo, "pair")


def test_optional_accepts_none_and_rejects_wrong_type() -> None:
    assert from_dict(Demo, {"seed": None}).seed is None
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Demo, {"seed": "abc"})
    config_error(excinfo, "seed", "'abc'")


def test_nested_dataclass_from_mapping_and_instance() -> None:
    cfg = from_dict(Demo, {"optim": {"lr": 0.01}})
    assert cfg.optim == Optim(lr=0.01)
    assert isinstance(cfg.optim, Optim)
    inst = Optim(steps=5)
    assert from_dict(Demo, {"optim": inst}).optim is inst


def test_to_dict_round_trip() -> None:
    cfg = Demo(epochs=3, optim=Optim(lr=0.2), pair=(0.25, 0.75))
    plain = to_dict(cfg)
    assert plain["optim"] == {"lr": 0.2, "momentum": 0.9, "steps": 100}
    assert plain["pair"] == [0.25, 0.75]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert from_dict(Demo, plain) == cfg


def test_merge_overrides_and_keeps_the_rest() -> None:
    base = Demo(epochs=3, optim=Optim(lr=0.2, steps=7))
    merged = merge(base, {"epochs": 9, "optim": {"lr": 0.5}})
    assert merged.epochs == 9
    assert merged.optim == Optim(lr=0.5, momentum=0.9, steps=7)  # nested keys merge one by one
    assert merged.batch == base.batch and merged.name == base.name
    assert base.epochs == 3 and base.optim.lr == 0.2  # the original is untouched


def test_merge_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ConfigError) as excinfo:
        merge(Demo(), {"optim": {"beta": 1}})
    config_error(excinfo, "beta")
    with pytest.raises(ConfigError):
        merge(Demo(), {"epochs": "x"})


# ---- resolve_config precedence ------------------------------------------------------------------------------


@pytest.fixture
def presets(monkeypatch: pytest.MonkeyPatch) -> dict:
    table = {("demo", "small"): {"epochs": 2, "batch": 8, "scale": 2.0, "optim": {"lr": 0.3, "steps": 30}}}

    def fake_preset_dict(group: str, name: str) -> dict:
        if (group, name) not in table:
            raise ConfigError(f"unknown {group} preset {name!r}; known presets: small")
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in table[(group, name)].items()}

    monkeypatch.setattr(config_mod, "preset_dict", fake_preset_dict)
    return table


def test_resolve_defaults_only() -> None:
    assert resolve_config(Demo, "demo") == Demo()


def test_resolve_precedence(presets: dict, tmp_path: Path) -> None:
    file = tmp_path / "cfg.yaml"
    file.write_text("batch: 16\nscale: 3.0\noptim:\n  steps: 40\n")
    cfg = resolve_config(Demo, "demo", preset="small", config_file=file, overrides={"scale": 4.0, "seed": None})
    assert cfg.name == "demo"  # default (nobody sets it)
    assert cfg.epochs == 2  # preset
    assert cfg.batch == 16  # file beats preset
    assert cfg.scale == 4.0  # override beats file and preset
    assert cfg.seed is None  # None overrides are ignored, default stays
    assert cfg.optim == Optim(lr=0.3, momentum=0.9, steps=40)  # nested: preset lr, file steps, default momentum


def test_resolve_preset_then_overrides(presets: dict) -> None:
    cfg = resolve_config(Demo, "demo", preset="small", overrides={"epochs": 5, "optim": {"momentum": 0.5}})
    assert (cfg.epochs, cfg.batch) == (5, 8)
    assert cfg.optim == Optim(lr=0.3, momentum=0.5, steps=30)


def test_resolve_none_override_does_not_clear_file_value(tmp_path: Path) -> None:
    file = tmp_path / "cfg.yaml"
    file.write_text("seed: 3\n")
    assert resolve_config(Demo, "demo", config_file=file, overrides={"seed": None}).seed == 3


def test_resolve_unknown_key_in_file(tmp_path: Path) -> None:
    file = tmp_path / "cfg.yaml"
    file.write_text("epochz: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        resolve_config(Demo, "demo", config_file=file)
    config_error(excinfo, "epochz", "epochs")


def test_resolve_unknown_preset(presets: dict) -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_config(Demo, "demo", preset="huge")
    config_error(excinfo, "'huge'", "small")


def test_real_preset_dict_unknown_preset_is_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_mod.preset_dict("no-such-group", "nothing")
    config_error(excinfo, "'nothing'")


# ---- read_yaml ----------------------------------------------------------------------------------------------


def test_read_yaml_mapping(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("a: 1\nb: [x, y]\nc:\n  d: 0.5\n")
    assert read_yaml(path) == {"a": 1, "b": ["x", "y"], "c": {"d": 0.5}}


def test_read_yaml_empty_is_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_yaml(path) == {}


def test_read_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(tmp_path / "nope.yaml")
    config_error(excinfo, str(tmp_path / "nope.yaml"), "does not exist")


def test_read_yaml_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(tmp_path)
    config_error(excinfo, str(tmp_path))


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: 1\n  b: 2\n", "{unclosed: 1\n", "a: @x\n"])
def test_read_yaml_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    message = config_error(excinfo, str(path), "not valid YAML")
    assert "\n" not in message


@pytest.mark.parametrize("text,kind", [("- 1\n- 2\n", "list"), ("42\n", "int"), ("just a string\n", "str")])
def test_read_yaml_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path), "mapping", kind)


def test_read_yaml_does_not_construct_python_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path))


def test_switching_arch_drops_the_old_architectures_options() -> None:
    from ssdd.config import deep_update

    base = {"pool": {"arch": "convnet-widening", "arch_args": {"width": 8, "depth": 2}, "size": 4}}
    deep_update(base, {"pool": {"arch": "resnet10", "arch_args": {"width": 4}}})
    assert base == {"pool": {"arch": "resnet10", "arch_args": {"width": 4}, "size": 4}}
    deep_update(base, {"pool": {"arch": "vit-tiny"}})
    assert base == {"pool": {"arch": "vit-tiny", "size": 4}}
    deep_update(base, {"pool": {"arch": "vit-tiny", "arch_args": {"depth": 2}}})  # same arch: options merge
    assert base["pool"]["arch_args"] == {"depth": 2}


@pytest.mark.parametrize("group", ["teacher", "distill", "evaluate"])
def test_every_shipped_preset_resolves_into_its_config(group: str) -> None:
    from ssdd.evaluation import EvaluationConfig
    from ssdd.methods.engine import DistillConfig, method_settings
    from ssdd.teachers import TeacherConfig

    classes = {"teacher": TeacherConfig, "distill": DistillConfig, "evaluate": EvaluationConfig}
    names = list_presets(group)
    assert names, f"no {group} presets shipped"
    for name in names:
        config = resolve_config(classes[group], group, name)
        if group == "distill":  # the method's own settings are validated by its settings class
            method_settings(config.method, config.settings)


def test_every_registered_method_has_a_tiny_and_a_cifar10_cpu_preset() -> None:
    from ssdd.methods import list_methods

    shipped = set(list_presets("distill"))
    missing = [f"{m}/{p}" for m in list_methods() for p in ("tiny", "cifar10-cpu") if f"{m}/{p}" not in shipped]
    assert not missing, missing


# ---- hostile configuration files: binary, oversized, alias bombs, deep nesting, bad strings and numbers ----------


def alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML file of a few hundred bytes whose ``arch_args`` expand to ``width ** levels`` strings."""
    lines = ["arch_args:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(("content", "offset"), [(bytes(range(256)) * 4, 0), (b"epochs: 3\n\x00\x01\x02", 10),
                                                (b"lr: 0.1\n# caf\xe9\n", 13), (b"\x80lr: 1", 0)],
                         ids=["all-bytes", "nul", "latin-1", "not-utf8"])
def test_binary_config_file_is_refused(tmp_path: Path, content: bytes, offset: int) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, f"config file {path} is binary, not YAML text (byte {offset} is not UTF-8 text); give a YAML")


def test_oversized_config_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "MAX_CONFIG_BYTES", 100)
    path = write(tmp_path, "a: 1\n" * 21)  # 105 bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read an oversized file"))
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path), "105 bytes, more than the 100")


@pytest.mark.parametrize("levels", [7, 9, 30])
def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 levels: int) -> None:
    """9^7 (4.8 million) values took 15.8 s and 776 MB before an error, 9^30 would never end: refused from the
    parser's events, before yaml builds anything."""
    path = write(tmp_path, alias_bomb(levels))
    assert path.stat().st_size < 2000
    monkeypatch.setattr(yaml, "safe_load", lambda text: pytest.fail("the bomb reached the loader"))
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path), "expands to more than 100000 values (through its aliases")


def test_aliases_within_the_limit_are_read_expanded(tmp_path: Path) -> None:
    # 9^5 = 59049 strings (plus the lists holding them) stay under 100000 values
    data = read_yaml(write(tmp_path, alias_bomb(5) + "lr: &lr 0.5\noptim: {lr: *lr, <<: {momentum: 0.8}}\n"))
    assert data["optim"] == {"lr": 0.5, "momentum": 0.8}
    leaves = data["arch_args"]["l4"]
    for _ in range(4):
        leaves = [x for sub in leaves for x in sub]
    assert leaves == ["lol"] * 9**5


def test_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "arch_args: &a {inner: *a}\n")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path), "alias *a is inside its own anchor")


@pytest.mark.parametrize("depth", [33, 100_000])
def test_deep_nesting_is_refused_without_recursion(tmp_path: Path, depth: int) -> None:
    path = write(tmp_path, "a: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    config_error(excinfo, str(path), "nests deeper than 32 levels")
    assert read_yaml(write(tmp_path, "a: " + "[" * 31 + "]" * 31 + "\n"))["a"]  # 32 levels with the mapping


@pytest.mark.parametrize(("text", "words"), [
    ('name: "\\ud800"\n', "not valid Unicode (a lone surrogate"),
    ('"\\udce9": 1\n', "not valid Unicode (a lone surrogate"),
    ("epochs: " + "9" * 5000 + "\n", "holds a value YAML cannot convert (Exceeds the limit (4300 digits)"),
    ("created: 2024-13-45\n", "holds a value YAML cannot convert (month must be in 1..12)"),
])
def test_unreadable_strings_and_numbers_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    assert "\n" not in config_error(excinfo, f"config file {path}", words)


@pytest.mark.parametrize("content", [alias_bomb(9), bytes(range(256))], ids=["alias-bomb", "binary"])
def test_hostile_config_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 content: str | bytes) -> None:
    from ssdd.cli import main

    path = write(tmp_path, content)
    assert main(["teacher", "--config", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ssdd: error: config file {path} ")
    assert not (tmp_path / "run").exists()


def test_alias_bomb_in_a_set_value_is_refused(capsys: pytest.CaptureFixture) -> None:
    from ssdd.cli import main

    bomb = "{" + alias_bomb(9).replace("arch_args:\n", "").replace("\n", ",").rstrip(",") + "}"
    assert main(["distill", "--method", "coreset", "--preset", "tiny", "--set", f"settings.x={bomb}",
                 "--out", "/nonexistent/never-written"]) == 2
    assert capsys.readouterr().err == ("ssdd: error: --set settings.x expands to more than 100000 values (through its "
                                       "aliases *name); write the settings out without repeating aliases\n")
