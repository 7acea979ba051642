from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from genius.common.config import ConfigError, load_config, resolve_path, save_config, REPO_ROOT
from genius.common.stage import parse_stage_config, stage_parser


@dataclass
class Optim:
    lr: float = 1e-4
    epochs: int = 3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])


@dataclass
class Retrieval:
    trie_backend: Literal["cpp", "python", "marisa"] = "cpp"
    num_beams: int = 50
    rerank: bool = True

    def validate(self) -> None:
        if self.num_beams < 1:
            raise ValueError("num_beams must be at least 1")


@dataclass
class Cfg:
    root: str | None = None
    optim: Optim = field(default_factory=Optim)
    retrieval: Retrieval = field(default_factory=Retrieval)


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_and_values(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, {"optim": {"lr": 3, "epochs": 5}, "retrieval": {"trie_backend": "python"}}))
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 5 and cfg.retrieval.trie_backend == "python" and cfg.retrieval.num_beams == 50


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, write(tmp_path, {"retrieval": {"num_beam": 10}}))
    msg = str(err.value)
    assert "retrieval.num_beam" in msg and "num_beams" in msg and "rerank" in msg and "cfg.yaml" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'retreival'"):
        load_config(Cfg, write(tmp_path, {"retreival": {}}))


def test_bad_enum_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, write(tmp_path, {"retrieval": {"trie_backend": "trie_cpp"}}))
    msg = str(err.value)
    assert "retrieval.trie_backend" in msg and "'trie_cpp'" in msg
    assert "'cpp'" in msg and "'python'" in msg and "'marisa'" in msg


@pytest.mark.parametrize("data, fragment", [
    ({"optim": {"epochs": 2.5}}, "optim.epochs: expected an integer"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"retrieval": {"rerank": "yes"}}, "retrieval.rerank: expected true or false"),
    ({"optim": {"betas": 0.9}}, "optim.betas: expected a list"),
    ({"optim": 3}, "optim: expected a mapping"),
])
def test_wrong_types(tmp_path, data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(Cfg, write(tmp_path, data))


def test_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match="num_beams must be at least 1"):
        load_config(Cfg, write(tmp_path, {"retrieval": {"num_beams": 0}}))


def test_overrides_apply_without_touching_yaml(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.1}})
    before = open(path).read()
    cfg = load_config(Cfg, path, ["optim.lr=0.5", "retrieval.trie_backend=marisa", "optim.betas=[0.5, 0.6]"])
    assert cfg.optim.lr == 0.5 and cfg.retrieval.trie_backend == "marisa" and cfg.optim.betas == [0.5, 0.6]
    assert open(path).read() == before
    with pytest.raises(ConfigError, match="retrieval.trie_backend"):
        load_config(Cfg, path, ["retrieval.trie_backend=fast"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(Cfg, path, ["optim.lr"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, {"optim": {"epochs": 7}}), ["retrieval.num_beams=4"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Cfg, tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_stage_parser_exits_with_message(tmp_path, capsys):
    parser = stage_parser("genius test", "test")
    path = write(tmp_path, {"optim": {"lrr": 1}})
    with pytest.raises(SystemExit) as exit_info:
        parse_stage_config(Cfg, parser, ["--config", path])
    assert exit_info.value.code == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_relative_paths_resolve_against_repo_or_root(tmp_path):
    assert resolve_path("worlds/demo") == REPO_ROOT / "worlds" / "demo"
    assert resolve_path("worlds/demo", tmp_path) == tmp_path / "worlds" / "demo"
    assert resolve_path(tmp_path / "x") == tmp_path / "x"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def write_text(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    # PyYAML alone keeps the later value: epochs would silently be 20
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: .*'epochs' is given twice"):
        load_config(Cfg, write_text(tmp_path, "optim:\n  epochs: 0\n  epochs: 20\n"))
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: .*'optim' is given twice"):
        load_config(Cfg, write_text(tmp_path, "optim:\n  epochs: 2\noptim:\n  lr: 0.5\n"))


def test_scientific_numbers_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(Cfg, write_text(tmp_path, "optim:\n  lr: 1e-3\n"), ["retrieval.num_beams=4", "optim.lr=2E-4"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert load_config(Cfg, write_text(tmp_path, "optim:\n  lr: 1e-3\n")).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="optim.epochs: expected an integer"):  # 1e3 is a float, as in YAML 1.2
        load_config(Cfg, write_text(tmp_path, "optim:\n  epochs: 1e3\n"))


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: byte 0xe9 is not UTF-8 text; save the file as UTF-8"):
        load_config(Cfg, write_text(tmp_path, b"optim:\n  lr: 0.1  # caf\xe9\n"))
    bom = load_config(Cfg, write_text(tmp_path, "\ufeffoptim:\n  lr: 0.25\n"))  # a BOM is fine
    assert bom.optim.lr == 0.25


def test_invalid_yaml_names_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: not valid YAML"):
        load_config(Cfg, write_text(tmp_path, "optim:\n  lr: 0.1\n betas: 2\n"))


@pytest.mark.parametrize("override", ["optim.lr=[1,", "optim.lr=*x", "optim.lr=!!python/object:os.system",
                                      "root=\udcff"])
def test_an_override_that_is_not_yaml_is_a_config_error(tmp_path, override):
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        load_config(Cfg, write(tmp_path, {}), [override])


def test_huge_numbers_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr: .* too large for a floating-point number"):
        load_config(Cfg, write_text(tmp_path, "optim:\n  lr: 1" + "0" * 400 + "\n"))
    with pytest.raises(ConfigError, match="optim.epochs: .* does not fit a 64-bit integer"):
        load_config(Cfg, write(tmp_path, {}), ["optim.epochs=100000000000000000000"])


def test_an_override_indexes_a_list_and_merges_a_section(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.1, "epochs": 4, "betas": [0.5, 0.6]}})
    cfg = load_config(Cfg, path, ["optim.betas[1]=0.7", "optim={epochs: 9}"])
    assert cfg.optim.betas == [0.5, 0.7] and cfg.optim.epochs == 9 and cfg.optim.lr == 0.1  # lr kept: merged
    with pytest.raises(ConfigError, match=r"holds 2 items; give the whole list \(--set optim.betas=\[...\]\)"):
        load_config(Cfg, path, ["optim.betas[2]=0.1"])
    with pytest.raises(ConfigError, match="does not set it as a list"):
        load_config(Cfg, write(tmp_path, {}), ["optim.betas[0]=0.1"])


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; pass the stage's YAML file"):
        load_config(Cfg, tmp_path)


def test_a_fixed_length_tuple_checks_its_length(tmp_path):
    @dataclass
    class Adam:
        betas: tuple[float, float] = (0.9, 0.98)

    assert load_config(Adam, write(tmp_path, {"betas": [0.5, 1]})).betas == (0.5, 1.0)
    for betas in ([0.9], [0.9, 0.98, 0.5]):  # AdamW failed on the first after work began; ignored the third
        with pytest.raises(ConfigError, match=rf"betas: expected a list of 2 items, got {len(betas)}"):
            load_config(Adam, write(tmp_path, {"betas": betas}))


def test_a_saved_config_reads_back_with_strings_that_look_like_numbers(tmp_path):
    @dataclass
    class Paths:
        results: str = "results"
        tag: str = "x"

    cfg = load_config(Paths, write(tmp_path, {}), ["results='1e5'", "tag='017'"])
    assert cfg.results == "1e5"
    save_config(cfg, tmp_path / "out" / "config.yaml")  # PyYAML would write 1e5 bare: read back as a float
    assert load_config(Paths, tmp_path / "out" / "config.yaml") == cfg


def test_a_bad_byte_after_a_bom_is_named_on_its_own_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: byte 0xff is not UTF-8 text"):
        load_config(Cfg, write_text(tmp_path, b"\xef\xbb\xbfoptim:\n  lr: 0.1 #\n\xff\n"))


def test_an_integer_range_prints_its_bounds_in_full():
    from genius.common.config_checks import check_number

    with pytest.raises(ValueError, match=r"train.seed: -1 is out of range; it must be an integer in \[0, 4294967295\]"):
        check_number("train.seed", -1, lo=0, hi=4294967295.0, integer=True)


@pytest.mark.parametrize("text", ["optim:\n  epochs: 017\n", "optim:\n  epochs: 1:30\n"])
def test_yaml_11_octal_and_base_60_integers_are_refused(tmp_path, text):
    # YAML 1.1 reads 017 as 15 and 1:30 as 90, which no reader of the file expects
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: not valid YAML: '(017|1:30)' is read as octal or base 60"):
        load_config(Cfg, write_text(tmp_path, text))
    assert load_config(Cfg, write_text(tmp_path, "optim:\n  epochs: 17\n")).optim.epochs == 17
