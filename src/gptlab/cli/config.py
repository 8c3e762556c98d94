"""`--config FILE.yaml` on the training verbs, and the `config.yaml` every training run writes.

Keys are the verb's long flag names without the dashes (`max-steps`; `max_steps` is read the same),
plus its positional argument by name (`base`). Flags on the command line win over the file. A run
writes every option, resolved (defaults filled in, e.g. the method's learning rate), to
OUT/config.yaml, so `gptlab finetune --config OUT/config.yaml` repeats it (the convention of LitGPT,
torchtune, Axolotl and TRL).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab import GptlabError

CONFIG_FILE = "config.yaml"
NOT_OPTIONS = ("help", "config")


def option_keys(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The verb's options by config key: the long flag without dashes, else the short one, else the dest."""
    keys = {}
    for act in p._actions:
        longs = [s for s in act.option_strings if s.startswith("--")]
        key = (longs or act.option_strings or [act.dest])[0].lstrip("-")
        if key not in NOT_OPTIONS:
            keys[key] = act
    return keys


def _yaml():
    try:
        import yaml
    except ImportError:
        raise GptlabError("--config needs PyYAML: pip install pyyaml") from None
    return yaml


def read_config(path) -> dict:
    """The mapping in a YAML file, or one line saying what is wrong with it."""
    yaml = _yaml()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GptlabError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise GptlabError(f"config file {path} is not valid YAML{line}: write one `flag-name: value` "
                          "per line") from None
    if not isinstance(data, dict):
        raise GptlabError(f"config file {path} is not a YAML mapping: write one `flag-name: value` per line "
                          "(e.g. `max-steps: 500`)")
    return data


def _value(act: argparse.Action, key: str, v, path):
    """A config value as the command line would have given it: typed and checked the same way."""
    if act.nargs == 0:  # a switch: store_true
        if not isinstance(v, bool):
            raise GptlabError(f"{path}: {key} is a switch: write true or false, not {v!r}")
        return v
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        raise GptlabError(f"{path}: {key} takes one value, not {type(v).__name__} {v!r}")
    text = str(v)
    try:
        value = act.type(text) if act.type else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise GptlabError(f"{path}: {key}: {e}") from None
    if act.choices is not None and value not in act.choices:
        raise GptlabError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, act.choices))}")
    return value


def apply_config(p: argparse.ArgumentParser, verb: str, path) -> None:
    """Make the file's values the defaults of verb parser `p` (so the command line still wins)."""
    keys = option_keys(p)
    data = read_config(path)
    given, unknown = {}, []
    for raw, v in data.items():
        key = str(raw).replace("_", "-")
        if key not in keys:
            unknown.append(str(raw))
        elif key in given:
            raise GptlabError(f"config file {path} gives {key} twice (as {key} and {key.replace('-', '_')})")
        else:
            given[key] = v
    if unknown:
        raise GptlabError(f"config file {path} has keys that are no option of `gptlab {verb}`: {', '.join(unknown)} "
                          f"(keys are the long flag names, e.g. max-steps; see `gptlab {verb} -h`)")
    p.set_defaults(**{keys[k].dest: _value(keys[k], k, v, path) for k, v in given.items()})


def resolved_config(p: argparse.ArgumentParser, a) -> dict:
    """Every option of the verb with the value this run used, by config key."""
    return {key: getattr(a, act.dest) for key, act in option_keys(p).items() if hasattr(a, act.dest)}


def write_config(a, out=None) -> Path:
    """OUT/config.yaml, written atomically (temp file + rename)."""
    from gptlab.models.io import atomic_write_text

    yaml = _yaml()
    out = Path(out if out is not None else a.out)
    text = (f"# every option of this `gptlab {a.cmd}` run: `gptlab {a.cmd} --config {CONFIG_FILE}` repeats it "
            "(flags on the command line win)\n"
            + yaml.safe_dump(resolved_config(a.verb_parser, a), sort_keys=False, allow_unicode=True))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, text)
    return out / CONFIG_FILE
