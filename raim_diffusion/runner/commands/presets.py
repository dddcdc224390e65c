"""``raim presets``: the shipped presets, the models each needs and whether they are here."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["ModelNeed", "add_parser", "model_needs", "run"]

_DESCRIPTION = """\
Without NAME: list every shipped preset (configs/*.yaml) with its description, the models it
needs (by config key) and whether each is here: a local file or folder exists, a hub id is in
the local Hugging Face cache, a built-in prior can be made offline. Nothing is downloaded and
the network is never used.

With NAME (a preset or a YAML file) and optional KEY=VALUE overrides: print that run's resolved
config as YAML (every key, references resolved), preceded by the models it needs as comments.
Save it, edit it and pass it back: `raim restore IN -o OUT --config FILE`.

How each team preset differs from the NTIRE 2024 RAIM report: docs/presets.md.
"""

# What a cached hub model must hold to count as present, by what loads it.
_PIPELINE_FILE = "model_index.json"
_MODEL_FILE = "config.json"


@dataclass(frozen=True)
class ModelNeed:
    """One model (or weights file) that a run config needs.

    Args:
        key (`str`): The config key that names it, e.g. ``"generate.model"`` or
            ``"prior.name[1]"``.
        source (`str`): The hub id, local path or built-in name, as the config gives it.
        present (`bool` or `None`): Whether it is here without a download: a local path exists,
            a hub id is in the local Hugging Face cache, a built-in prior can be made offline;
            `None` when it cannot be checked (a custom segmenter backend).
        status (`str`): Where it was found, or how to get it.
    """

    key: str
    source: str
    present: bool | None
    status: str


def _hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local(key: str, source: str, what: str = "file or folder") -> ModelNeed:
    path = Path(source).expanduser()
    if path.exists():
        return ModelNeed(key, source, True, "local folder" if path.is_dir() else "local file")
    return ModelNeed(key, source, False, f"no such {what}")


def _hub_or_local(key: str, source: str, filename: str) -> ModelNeed:
    """A model that loads from a local folder or a hub id (the local cache is looked at only)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(source).expanduser().exists() or not _hub_id(source):
        return _local(key, source, "folder")
    # A str is the cached file; None or a "known not to exist" marker mean it is not cached.
    if isinstance(try_to_load_from_cache(source, filename), str):
        return ModelNeed(key, source, True, "in the Hugging Face cache")
    return ModelNeed(key, source, False, f"not in the Hugging Face cache: hf download {source}")


def _builtin_prior(key: str, name: str) -> ModelNeed:
    from raim_diffusion.prior.builtin import PACKAGE, PIP_NAME, builtin_cache_dir, get_builtin

    entry = get_builtin(name)
    if (builtin_cache_dir() / f"{entry.name}.safetensors").is_file():
        return ModelNeed(key, name, True, "built in; converted copy cached")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        if all((models / f"{entry.stem}{ext}").is_file() for ext in (".param", ".bin")):
            return ModelNeed(key, name, True, f"built in; {PIP_NAME} installed")
    return ModelNeed(key, name, False, f"built in, needs `pip install {PIP_NAME}`")


def _prior(key: str, name: str) -> ModelNeed:
    from raim_diffusion.prior import is_builtin
    from raim_diffusion.runner.config import TINY_PREFIX

    if name.startswith(TINY_PREFIX):
        return ModelNeed(key, name, True, "tiny random network, made on use")
    if is_builtin(name):
        return _builtin_prior(key, name)
    return _local(key, name)


def _segmenter(key: str, name: str) -> Iterator[ModelNeed]:
    """The models of a segmenter name, read the way `load_segmenter` reads it."""
    from raim_diffusion.artifacts.segmentation import (
        DEFAULT_MASK2FORMER,
        DEFAULT_SEGFORMER,
        SEGMENTER_BACKENDS,
    )

    aliases = {"segformer": DEFAULT_SEGFORMER, "mask2former": DEFAULT_MASK2FORMER}
    lower = name.lower()
    if lower == "none":
        return
    if lower in aliases:
        yield _hub_or_local(key, aliases[lower], _MODEL_FILE)
        return
    if lower in SEGMENTER_BACKENDS:  # another registered backend, by its bare name
        yield ModelNeed(key, name, None, f"not checked: segmenter backend {lower!r}")
        return
    scheme, sep, argument = name.partition(":")
    backend = scheme.lower()
    if sep and backend in SEGMENTER_BACKENDS and not Path(name).expanduser().exists():
        if backend == "transformers":
            yield _hub_or_local(key, argument, _MODEL_FILE)
        elif backend == "mmseg":
            config, _, checkpoint = argument.partition(":")
            yield _local(key, config, "file")
            if checkpoint:
                yield _local(key, checkpoint, "file")
        else:
            yield ModelNeed(key, name, None, f"not checked: segmenter backend {backend!r}")
        return
    yield _hub_or_local(key, name, _MODEL_FILE)


def model_needs(config: DictConfig) -> list[ModelNeed]:
    """The models a run config loads, for the stages it runs, and whether each is here.

    Nothing is downloaded or loaded: local paths are checked for existence, hub ids against
    the local Hugging Face cache (``model_index.json`` of a pipeline, ``config.json`` of a
    model), built-in priors against their cached conversion or the installed package.

    Args:
        config (`DictConfig`): A loaded run config ([`~raim_diffusion.runner.config.load_config`]).

    Returns:
        `list[ModelNeed]`: In pipeline order: priors, diffusion model and ControlNet,
        segmenter and SAM, fusion network. A fusion of `None` (the pyramid blend) and a
        segmenter of ``"none"`` need nothing and are left out.
    """
    from raim_diffusion.runner.config import TINY_PREFIX

    stages = set(config.stages)
    needs: list[ModelNeed] = []
    if "prior" in stages:
        names = config.prior.name
        if isinstance(names, str):
            needs.append(_prior("prior.name", names))
        else:
            needs.extend(_prior(f"prior.name[{i}]", str(n)) for i, n in enumerate(names))
    if "generate" in stages:
        for key, value, filename in (
            ("generate.model", config.generate.model, _PIPELINE_FILE),
            ("generate.controlnet", config.generate.controlnet, _MODEL_FILE),
        ):
            if value is None:
                continue
            if str(value).startswith(TINY_PREFIX):
                needs.append(ModelNeed(key, value, True, "tiny random model, made on use"))
            else:
                needs.append(_hub_or_local(key, str(value), filename))
    if "detect" in stages:
        if config.detect.segmenter is not None:
            needs.extend(_segmenter("detect.segmenter", str(config.detect.segmenter)))
        if config.detect.sam is not None:
            needs.append(_local("detect.sam", str(config.detect.sam), "file"))
    if "fuse" in stages and config.fuse.fusion is not None:
        fusion = str(config.fuse.fusion)
        if fusion.startswith(TINY_PREFIX):
            needs.append(ModelNeed("fuse.fusion", fusion, True, "tiny random network, made on use"))
        else:
            needs.append(_local("fuse.fusion", fusion, "folder"))
    return needs


def _mark(need: ModelNeed) -> str:
    return {True: "present", False: "missing", None: "unknown"}[need.present]


def _need_lines(needs: list[ModelNeed], indent: str) -> list[str]:
    if not needs:
        return [f"{indent}(no model files: built-in operations only)"]
    width = max(len(n.key) for n in needs)
    return [f"{indent}{_mark(n):<8} {n.key:<{width}}  {n.source} ({n.status})" for n in needs]


def _leading_comments(name: str) -> list[str]:
    """The comment block at the top of a preset or YAML file (where to get its models)."""
    from raim_diffusion.resources import data_dir

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = data_dir("configs") / f"{name}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return [*lines, "#"] if lines else []


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``presets`` subcommand."""
    parser = subparsers.add_parser(
        "presets",
        help="list the presets and the models each needs, or show one as YAML",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help="a preset or YAML file: print its resolved config"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied before printing, e.g. generate.num_inference_steps=20",
    )
    parser.set_defaults(func=run)


def _list() -> int:
    from raim_diffusion.runner.common import report_usage_error
    from raim_diffusion.runner.config import list_presets, load_config

    names = list_presets()
    width = max(len(n) for n in names)
    lines = ["Presets (raim restore IN -o OUT --config NAME; `raim presets NAME` prints one):", ""]
    complete = failed = 0
    for name in names:
        try:
            config = load_config(name)
            needs = model_needs(config)
        except ValueError as err:  # a broken shipped preset: say so, keep listing the others
            report_usage_error("presets", err)
            lines.append(f"{name:<{width}}  (does not load)")
            failed += 1
            continue
        lines.append(f"{name:<{width}}  {config.description}")
        lines.extend(_need_lines(needs, "  "))
        complete += all(n.present is not False for n in needs)
    lines += [
        "",
        f"{complete} of {len(names)} presets have every model they need here; "
        "how each team preset differs from the report: docs/presets.md",
    ]
    print("\n".join(lines))
    return 1 if failed else 0


def _show(name: str, overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from raim_diffusion.errors import RaimError
    from raim_diffusion.runner.common import report_usage_error
    from raim_diffusion.runner.config import (
        CALL_ARGUMENTS,
        call_kwargs,
        load_config,
        resolved_call_kwargs,
    )

    try:
        config = load_config(name, overrides)
        needs = model_needs(config)
    except (RaimError, ValueError) as err:
        return report_usage_error("presets", err)
    header = _leading_comments(name)
    header += [
        f"# raim presets {' '.join([name, *overrides])}: the resolved config.",
        "# Models it needs:",
    ]
    header += _need_lines(needs, "#   ")
    given = call_kwargs(config)
    resolved = resolved_call_kwargs(config)
    footer = ["# Settings left null use the pipeline's defaults:"]
    footer += [
        f"#   {key}: {json.dumps(resolved[arg])}"
        for key, arg in CALL_ARGUMENTS.items()
        if arg not in given and arg in resolved
    ]
    print("\n".join(header))
    print(OmegaConf.to_yaml(config), end="")
    print("\n".join(footer))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``raim presets``; returns 0, 1 if a shipped preset does not load, or 2 with a
    one-line message for an unknown preset or a bad override."""
    if args.name is None:
        if args.overrides:  # unreachable through argparse; kept for direct callers
            from raim_diffusion.runner.common import report_usage_error

            return report_usage_error("presets", ValueError("overrides need a preset NAME"))
        return _list()
    return _show(args.name, list(args.overrides))
