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
