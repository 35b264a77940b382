"""--config FILE (utils.parse_args, in every script through utils.run_main), the recipes/ folder, and every
script's flags: help on each, defaults shown (utils.HelpFormatter), --model choices."""
import argparse
import glob
import importlib
import json
import os
import re

import pytest

import copy_paste
import dataset_tool
import export
import model as models
import train
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml")) + glob.glob(os.path.join(REPO, "recipes", "*.json")))
# the scripts at the repository root, as test_scripts_help finds them
SCRIPTS = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, "*.py"))
                 if 'if __name__ == "__main__":' in open(path).read() and "argparse" in open(path).read())


def train_parser():
    parser = utils.add_config_flag(train.get_args_parser())
    parser.prog = "train.py"
    return parser


def parse(parser, *argv):
    return utils.parse_args(parser, list(map(str, argv)))


def write(path, text):
    path.write_text(text)
    return path


def config_error(tmp_path, text, *argv, name="config.yaml"):
    """The UserError train.py's parser raises for a config file holding `text`."""
    path = write(tmp_path / name, text)
    with pytest.raises(utils.UserError) as error:
        parse(train_parser(), "--config", path, *argv)
    return str(error.value).replace(str(path), "FILE")


# ---------------------------------------------------------------- recipes
def test_the_recipes_are_found():
    assert {"demo.yaml", "unetpp-effb4.yaml", "upernet-convnext.yaml"} <= {os.path.basename(p) for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_parses_with_train_py_and_says_what_it_is_for(recipe):
    args = parse(train_parser(), "--config", recipe)
    values = utils.read_config(recipe)
    assert values, f"{recipe} sets nothing"
    for key, value in values.items():  # each key reached its flag
        assert getattr(args, key.replace("-", "_")) == value, key
    models.resolve_encoder(args.encoder)
    with open(recipe) as f:
        first = f.readline()
    assert first.startswith("# ") and len(first) > 40, f"{recipe}: the first line says what it is for and needs"


def test_demo_recipe_is_the_readme_quickstart():
    args = parse(train_parser(), "--config", os.path.join(REPO, "recipes", "demo.yaml"))
    quickstart = parse(train_parser(), *"--model unet --encoder r18 --size 256 --epochs 25 --val-every 5 "
                                        "--output runs/demo".split())
    assert {**vars(args), "config": None} == vars(quickstart)
    with open(os.path.join(REPO, "README.md")) as f:
        assert "train.py --model unet --encoder r18 --size 256 --epochs 25 --val-every 5 --output runs/demo" in f.read()


# ---------------------------------------------------------------- the file's values
def test_dashed_and_dest_keys_set_defaults_and_the_command_line_overrides_them(tmp_path):
    path = write(tmp_path / "recipe.yaml", "data-root: /data\nsize: 32\nlr: 5e-4\nextra_json: [a.json, b.json]\n"
                                           "preflight: false\nema: true\ndecoder-channels: [8]\n")
    args = parse(train_parser(), "--config", path, "--size", 48, "--extra-json", "c.json")
    assert (args.data_root, args.size, args.lr, args.extra_json) == ("/data", 48, 5e-4, ["c.json"])
    assert (args.preflight, args.ema, args.decoder_channels, args.config) == (False, True, [8], str(path))
    assert parse(train_parser(), "--config", path).extra_json == ["a.json", "b.json"]


def test_a_value_only_the_command_line_replaces_is_not_checked(tmp_path):
    # a GPU run's args.json replayed on a machine without one
    path = write(tmp_path / "args.json", json.dumps({"device": "cuda:7", "size": 32}))
    assert parse(train_parser(), "--config", path, "--device", "cpu").device == "cpu"
    assert "key 'device': argument --device: cuda:7: " in config_error(tmp_path, "device: cuda:7")


def test_unknown_key_is_refused_naming_the_file_and_the_closest_flag(tmp_path, capsys):
    path = write(tmp_path / "recipe.yaml", "size: 32\ndata_rot: /data\n")
    with pytest.raises(SystemExit) as stop:
        utils.run_main(train.main, train_parser(), ["--config", str(path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: --config {path}: unknown key 'data_rot': train.py has no such flag; "
                                       f"did you mean 'data_root' (--data-root)?\n")
    assert config_error(tmp_path, "zzzz: 1") == \
        "--config FILE: unknown key 'zzzz': train.py has no such flag; see train.py --help for its flags"


@pytest.mark.parametrize("text, message", [
    ("size: 0", "key 'size': argument --size: must be a positive integer, got 0; fix or remove it in the file, "
                "or give --size on the command line"),
    ("model: unetp", "key 'model': argument --model: invalid choice: 'unetp'"),
    ("amp: off", "key 'amp': argument --amp: invalid choice: 'False' (choose from 'off', 'bf16', 'fp16') (YAML reads "
                 "yes, no, on and off as true and false: quote the value)"),
    ("size: null", "key 'size': null, but --size takes a value (default 512)"),
    ("ema: 1", "key 'ema': 1, but --ema is a switch: true or false"),
    ("decoder-channels: []", "key 'decoder-channels': argument --decoder-channels: expected at least one argument"),
    ("loss: {ce: 1}", "key 'loss': a mapping ({'ce': 1}) is no flag value"),
    ("size: 32\nsize_: 3", "unknown key 'size_'"),
    ("data_root: a\ndata-root: b", "keys 'data_root' and 'data-root' both set --data-root: keep one of them"),
])
def test_values_go_through_the_flags_own_parsing(tmp_path, text, message):
    assert message in config_error(tmp_path, text)


@pytest.mark.parametrize("name, text, message", [
    ("config.yaml", "- size\n- 32\n", "--config FILE holds a list, not a mapping of flag names to values"),
    ("config.yaml", "size: [32\n", "--config FILE is not valid YAML: "),
    ("config.json", '{"size": 32,}', "--config FILE is not valid JSON: "),
])
def test_a_file_that_is_no_mapping_is_refused(tmp_path, name, text, message):
    assert config_error(tmp_path, text, name=name).startswith(message)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(utils.UserError, match=re.escape(f"--config {tmp_path}/none.yaml cannot be read (No such file")):
        parse(train_parser(), "--config", tmp_path / "none.yaml")


def test_null_stands_for_a_flag_not_given_and_run_folder_flags_are_skipped(tmp_path):
    path = write(tmp_path / "args.json", json.dumps({"fold": None, "unlabeled": None, "resume": "auto",
                                                     "overwrite": True, "config": "other.yaml"}))
    args = parse(train_parser(), "--config", path)
    assert (args.fold, args.unlabeled, args.resume, args.overwrite, args.config) == (None, None, None, False, str(path))
    assert parse(train_parser(), "--config", path, "--resume").resume == "auto"


def test_other_scripts_read_config_too(tmp_path):
    """Subcommands' flags, a required flag given by the file, and positionals, which stay on the command line."""
    path = write(tmp_path / "subset.yaml", "seed: 3\njson: val.json\n")
    args = parse(utils.add_config_flag(dataset_tool.get_args_parser()), "--config", path, "subset", "--n", 2)
    assert (args.command, args.seed, args.json, args.n) == ("subset", 3, "val.json", 2)
    path = write(tmp_path / "paste.yaml", "out: pasted\nn: 7\n")
    args = parse(utils.add_config_flag(copy_paste.get_args_parser()), "--config", path)
    assert (args.out, args.n) == ("pasted", 7)
    path = write(tmp_path / "export.yaml", "checkpoint: best.pt\noutput: model.onnx\n")
    args = parse(utils.add_config_flag(export.get_args_parser()), "--config", path, "--output", "other.onnx")
    assert (args.checkpoint, args.output) == ("best.pt", "other.onnx")
    parser = argparse.ArgumentParser(prog="compare.py")
    parser.add_argument("runs", nargs="+", help="run folders")
    path = write(tmp_path / "compare.yaml", "runs: [a, b]\n")
    with pytest.raises(utils.UserError, match=re.escape(f"--config {path}: 'runs' is the positional argument RUNS of "
                                                        f"compare.py: give it on the command line and drop it from "
                                                        f"the file")):
        parse(utils.add_config_flag(parser), "--config", path, "a")


# ---------------------------------------------------------------- replay of a run's args.json
@pytest.mark.slow
def test_args_json_replays_the_run(tiny_demo, tiny_run, tiny_train_argv, tmp_path):
    replay = tmp_path / "replay"
    utils.run_main(train.main, train.get_args_parser(),
                   ["--config", str(tiny_run / "args.json"), "--seed", "1", "--output", str(replay)])
    original = json.loads((tiny_run / "args.json").read_text())
    replayed = json.loads((replay / "args.json").read_text())
    assert (replayed.pop("seed"), replayed.pop("output"), replayed.pop("config")) == (1, str(replay),
                                                                                      str(tiny_run / "args.json"))
    assert (original.pop("seed"), original.pop("output")) == (0, str(tiny_run))
    assert replayed == original
    assert (replay / utils.BEST_CHECKPOINT).is_file()


# ---------------------------------------------------------------- every flag of every script
def script_parsers():
    """(script, parser) of each root script with get_args_parser, subcommands' parsers included."""
    for name in SCRIPTS:
        module = importlib.import_module(name)
        if hasattr(module, "get_args_parser"):
            parsers = [(name, module.get_args_parser())]
            while parsers:
                where, parser = parsers.pop()
                yield where, parser
                parsers += [(f"{where} {command}", sub) for action in parser._actions
                            if isinstance(action, argparse._SubParsersAction) for command, sub in action.choices.items()]


def test_every_flag_of_every_script_has_help_and_shows_its_default():
    assert {"train", "inference", "export", "serve", "pseudo_label", "copy_paste", "dataset_tool", "demo",
            "compare_runs"} <= set(SCRIPTS)
    for script, parser in script_parsers():
        assert parser.formatter_class is utils.HelpFormatter, script
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help and action.help.strip(), f"{script}: {action.option_strings or action.dest} has no help"


def test_help_shows_defaults_but_not_of_switches(capsys):
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training epochs (passes over the data) (default: 30)" in text
    assert "weight decay of the weights (biases and norm scales are not decayed) (default: 0.0001)" in text
    assert "(default: False)" not in text and "(default: True)" not in text
    assert "(default: the run folder's last.pt)" in text and "(default: None)" in text  # said in words, or none


def test_a_mistyped_model_fails_at_argparse(capsys):
    with pytest.raises(SystemExit) as stop:
        train_parser().parse_args(["--model", "unetp"])
    assert stop.value.code == 2
    assert "argument --model: invalid choice: 'unetp' (choose from 'deeplabv3p', 'segformer', 'unet', 'unetpp', " \
           "'upernet')" in capsys.readouterr().err


def test_the_pixel_limit_has_one_flag_name_everywhere():
    flags = {script: [option for action in parser._actions for option in action.option_strings if "pixel" in option]
             for script, parser in script_parsers()}
    assert flags["serve"] == flags["train"] == flags["inference"] == ["--max-image-pixels"]
    assert {option for options in flags.values() for option in options} == {"--max-image-pixels"}
