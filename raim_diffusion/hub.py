"""Where model weights come from, and one error format when they are missing or damaged.

Every model raim-diffusion loads (pipelines and ControlNets, segmenters, priors, fusion networks,
SAM, metric weights) reports problems through the helpers here, so a user sees one format:

* missing weights raise [`~raim_diffusion.errors.MissingWeightsError`]:
  ``KIND NAME is not available offline: it is not in the local Hugging Face cache and HF_HUB_OFFLINE
  is set; download it with `hf download NAME` or pass the path of a local copy`` (or, for a
  file, ``KIND PATH is not available (no such file); HOW``; for a folder that lacks something,
  ``KIND FOLDER: the local folder is incomplete (WHAT); it must hold CONTENTS``);
* a file or folder that exists but cannot be used raises
  [`~raim_diffusion.errors.InvalidWeightsError`]: ``KIND PATH: what is wrong``.

[`load_cached_first`] loads a hub id from the local Hugging Face cache before it tries the hub,
and tries the hub only when it can answer (not offline, and its host accepts a connection within
two seconds): an offline machine fails at once instead of after the hub client's retries.
[`read_weights_file`] reads ``.safetensors`` files and weights-only PyTorch files without
running code; [`extract_state_dict`] finds the network's weights inside a training checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import socket
import threading
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from .errors import InvalidWeightsError, MissingWeightsError, RaimError

__all__ = [
    "MODEL_CONTENTS",
    "PIPELINE_CONTENTS",
    "STATE_DICT_KEYS",
    "WEIGHT_SUFFIXES",
    "extract_state_dict",
    "first_line",
    "hub_offline",
    "hub_reachable",
    "load_cached_first",
    "missing_file_error",
    "missing_weights_error",
    "read_json_object",
    "read_weights_file",
]

_T = TypeVar("_T")
_TRUE = ("1", "true", "yes", "on")

PIPELINE_CONTENTS = (
    "a diffusers pipeline: model_index.json and one folder per component with its config and "
    "weights"
)
MODEL_CONTENTS = "config.json and the weights"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
#: Where training checkpoints keep the network's weights, most wanted first (EMA weights before
#: the raw ones, as BasicSR saves both).
STATE_DICT_KEYS = (
    "params_ema",
    "params-ema",
    "params",
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "net_g",
    "generator",
)
# Libraries a model_index.json may name: diffusers can import any module named there.
_LIBRARIES = ("diffusers", "transformers", "raim_diffusion")
_MAX_JSON_BYTES = 16 << 20
_WEIGHT_FILE = re.compile(r".+\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5|onnx)(\.index\.json)?")
# Errors diffusers / transformers raise for an unusable local folder, beyond OSError/ValueError.
_FOLDER_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


class _Problem(Exception):
    """What is wrong with a file, without the file's name (added by the caller)."""


# --------------------------------------------------------------------------- messages


def first_line(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"``, shortened to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_file_error(
    kind: str, path: str | os.PathLike, how: str, *, thing: str = "file"
) -> MissingWeightsError:
    """``KIND PATH is not available (no such file); HOW`` for a local file or folder.

    Args:
        kind (`str`): What the file is, e.g. ``"prior"`` or ``"SAM checkpoint"``.
        path (`str` or `os.PathLike`): The file or folder that does not exist.
        how (`str`): How to provide it, e.g. ``"pass a folder saved by save_pretrained"``.
        thing (`str`, *optional*, defaults to `"file"`): ``"file"``, ``"folder"``, or e.g.
            ``"file or folder"``.
    """
    return MissingWeightsError(f"{kind} {path} is not available (no such {thing}); {how}")


def missing_weights_error(
    model: str | os.PathLike,
    error: BaseException | None = None,
    *,
    kind: str = "model",
    offline: str | None = None,
    expected: str = PIPELINE_CONTENTS,
    hint: str = "",
) -> MissingWeightsError:
    """A [`MissingWeightsError`] that says which model is missing and how to provide it.

    Every model loaded from the Hugging Face hub (pipelines, ControlNets, segmenters) reports a
    missing model in this one format.

    Args:
        model (`str` or `os.PathLike`): The hub id or folder that failed to load.
        error (`BaseException`, *optional*): The loading error; its first line is quoted.
        kind (`str`, *optional*, defaults to `"model"`): What the model is, e.g.
            ``"segmentation model"``.
        offline (`str`, *optional*): Why the hub was not tried (e.g. ``"HF_HUB_OFFLINE is
            set"``); `None` when the download was tried and failed.
        expected (`str`, *optional*): What a local folder must hold (for an existing folder).
        hint (`str`, *optional*): Appended to the advice, e.g. how to run without the model.

    Returns:
        `MissingWeightsError`: To be raised ``from error``.
    """
    name = str(model)
    detail = f" ({first_line(error)})" if error is not None else ""
    if offline is None and Path(name).is_dir():
        return MissingWeightsError(
            f"{kind} {name}: the local folder is incomplete{detail}; it must hold {expected}"
        )
    fix = f"download it with `hf download {name}` or pass the path of a local copy{hint}"
    if offline is not None:
        return MissingWeightsError(
            f"{kind} {name} is not available offline: it is not in the local Hugging Face cache "
            f"and {offline}; {fix}"
        )
    return MissingWeightsError(
        f"{kind} {name} is not in the local Hugging Face cache and could not be downloaded"
        f"{detail}; {fix}"
    )


def _incomplete(kind: str, folder: Path, what: str, expected: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{kind} {folder}: the local folder is incomplete ({what}); it must hold {expected}"
    )


# --------------------------------------------------------------------------- the hub


def hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in _TRUE for f in flags)


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a download can work at all: not offline, and the hub's host answers.

    Without this an offline machine waits through the hub client's retries (about 25 s) before
    failing on a model that is not cached. Behind a proxy only the proxy knows, so the answer
    is yes. The probe (name lookup included) is bounded by ``timeout``.

    Args:
        timeout (`float`, *optional*, defaults to 2.0): Seconds to wait for the connection.
    """
    if hub_offline():
        return False
    proxies = urllib.request.getproxies()
    if proxies.get("https") or proxies.get("http"):
        return True
    url = urlparse(_endpoint())
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                answered.append(True)
        except Exception:  # no network, no DNS, refused: all mean "cannot download"
            answered.append(False)

    # A thread bounds the name lookup too, which create_connection's timeout does not cover.
    thread = threading.Thread(target=probe, name="raim-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_cached_first(
    load: Callable[..., _T],
    model: str | os.PathLike,
    kwargs: Mapping[str, Any] | None = None,
    *,
    kind: str = "model",
    required: Sequence[str] = (),
    expected: str = MODEL_CONTENTS,
    hint: str = "",
) -> _T:
    """``load(model, **kwargs)`` from a local folder, else the local cache, else the hub.

    A local folder is loaded as it is; what it lacks or holds damaged is reported naming the
    file. A hub id is loaded with ``local_files_only=True`` first, so a cached model needs no
    network; the hub is tried next only when [`hub_reachable`] (so an offline machine fails at
    once).

    Args:
        load (`Callable`): A ``from_pretrained``-like loader.
        model (`str` or `os.PathLike`): A hub id or a local folder.
        kwargs (`Mapping`, *optional*): Passed to ``load``.
        kind (`str`, *optional*, defaults to `"model"`): What the model is, for messages.
        required (`Sequence[str]`, *optional*): Files a local folder must hold (checked first).
        expected (`str`, *optional*): What a local folder must hold, for messages.
        hint (`str`, *optional*): Extra advice for a missing model.

    Returns:
        Whatever ``load`` returns.

    Raises:
        `MissingWeightsError`: The model is neither local nor downloadable, or a local folder
            lacks files.
        `InvalidWeightsError`: A local folder (or cached file) exists but is damaged or is not
            such a model.
    """
    kwargs = dict(kwargs or {})
    name = str(model)
    if Path(name).exists():
        return _load_folder(load, model, kwargs, kind=kind, required=required, expected=expected)
    if not _is_repo_id(name):
        raise MissingWeightsError(f"{kind} {name}: no such folder, and not a hub model id")
    try:
        return load(model, **{**kwargs, "local_files_only": True})
    except RaimError:
        raise
    except (OSError, ValueError) as err:
        local_error = err
        damaged = _damaged_in_error(err)
        if damaged is not None:
            raise InvalidWeightsError(
                f"{kind} {name}: {damaged} (in the local Hugging Face cache); download it again "
                f"with `hf download {name} --force-download`"
            ) from err
    if kwargs.get("local_files_only"):
        offline = "local_files_only=True was given"
    elif hub_offline():
        offline = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        offline = f"the hub ({_endpoint()}) cannot be reached"
    else:
        offline = None
    if offline is not None:
        raise missing_weights_error(name, kind=kind, offline=offline, hint=hint) from local_error
    try:
        return load(model, **kwargs)
    except RaimError:
        raise
    except (OSError, ValueError) as err:
        raise missing_weights_error(name, err, kind=kind, hint=hint) from err


def _load_cached_first(load: Callable[..., _T], model: str | os.PathLike, **kwargs: Any) -> _T:
    """[`load_cached_first`] for a diffusers pipeline or model class's ``from_pretrained``."""
    owner = getattr(load, "__self__", None)
    names = [c.__name__ for c in getattr(owner, "__mro__", ())]
    if "DiffusionPipeline" in names:
        return load_cached_first(
            load, model, kwargs, required=("model_index.json",), expected=PIPELINE_CONTENTS
        )
    kind = "ControlNet" if any("ControlNet" in n for n in names) else "model"
    return load_cached_first(load, model, kwargs, kind=kind, required=("config.json",))


# --------------------------------------------------------------------------- local folders


def read_json_object(file: str | os.PathLike, *, kind: str) -> dict[str, Any]:
    """Read a JSON config file that must hold one object.

    Args:
        file (`str` or `os.PathLike`): E.g. a folder's ``config.json``.
        kind (`str`): What the folder is, for messages.

    Raises:
        `InvalidWeightsError`: Not a regular file, too large, not JSON, or not an object.
    """
    file = Path(file)
    if not file.is_file():
        raise InvalidWeightsError(f"{kind} {file}: not a regular file")
    if file.stat().st_size > _MAX_JSON_BYTES:
        raise InvalidWeightsError(f"{kind} {file}: too large for a config file")
    try:
        data = json.loads(file.read_bytes())
    except (ValueError, OSError) as err:
        raise InvalidWeightsError(f"{kind} {file}: not valid JSON ({first_line(err)})") from err
    if not isinstance(data, dict):
        raise InvalidWeightsError(
            f"{kind} {file}: expected a JSON object, got a {type(data).__name__}"
        )
    return data


def _known_library(library: str) -> bool:
    if library.split(".")[0] in _LIBRARIES:
        return True
    # "stable_diffusion" and the like name a diffusers pipeline module.
    return (
        library.isidentifier()
        and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
    )


def _has_weights(folder: Path) -> bool:
    return any(_WEIGHT_FILE.fullmatch(p.name) for p in folder.iterdir() if p.is_file())


def _check_folder(folder: Path, kind: str, required: Sequence[str], expected: str) -> None:
    for name in required:
        if not (folder / name).is_file():
            raise _incomplete(kind, folder, f"no {name}", expected)
    # A model's folder (config.json, unlike a scheduler's or tokenizer's) needs its weights;
    # checked here because diffusers logs a warning of its own before it fails on them.
    if (folder / "model_index.json").is_file():
        models = [
            folder / c for c in _listed_components(folder) if (folder / c / "config.json").is_file()
        ]
    else:
        models = [folder] if (folder / "config.json").is_file() else []
    for model in models:
        if not _has_weights(model):
            where = "" if model == folder else f" in {model}"
            raise _incomplete(kind, folder, f"no weights file{where}", expected)
    for name in ("model_index.json", "config.json"):
        if not (folder / name).exists():
            continue
        data = read_json_object(folder / name, kind=kind)
        if name != "model_index.json":
            continue
        for component, value in data.items():
            if component.startswith("_") or not isinstance(value, list) or not value:
                continue
            library = value[0]
            if library is not None and not (isinstance(library, str) and _known_library(library)):
                raise InvalidWeightsError(
                    f"{kind} {folder}: model_index.json gives {component} the library "
                    f"{library!r}; only {', '.join(_LIBRARIES)} components are loaded"
                )


def _listed_components(folder: Path) -> list[str]:
    """The components model_index.json lists with a library and a class, sorted."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(index, dict):
        return []
    return sorted(
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    )


def _missing_components(folder: Path) -> list[str]:
    return [name for name in _listed_components(folder) if not (folder / name).is_dir()]


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's header (or size), or `None`."""
    from safetensors import safe_open

    try:
        if file.stat().st_size == 0:
            return "the file is empty"
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors reports every header problem as its own error type
        return f"not a valid safetensors file, or truncated ({first_line(err)})"
    return None


def _damaged_file(file: Path) -> str:
    """``PATH: what is wrong`` for a weights file a loader could not read."""
    if file.suffix == ".safetensors":
        problem = _safetensors_problem(file)
        return f"{file}: {problem or 'cannot be loaded'}"
    try:
        _read_weights(file)
    except _Problem as problem:
        return f"{file}: {problem}"
    return f"{file}: cannot be loaded"


def _damaged_in_error(error: BaseException) -> str | None:
    """``PATH: what is wrong`` when ``error`` is a loader's "cannot read this weights file"."""
    match = re.search(r"Unable to load weights from checkpoint file for '([^']+)'", str(error))
    if match:
        return _damaged_file(Path(match.group(1)))
    return None


def _first_damaged_safetensors(folder: Path) -> str | None:
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file}: {problem}"
    return None


def _folder_error(folder: Path, error: BaseException, kind: str, expected: str) -> RaimError:
    """Our error for a loader's failure on an existing local folder."""
    text = str(error)
    match = re.search(r"config file at '([^']+)' is not a valid JSON", text)
    if match:
        return InvalidWeightsError(f"{kind} {folder}: {match.group(1)} is not valid JSON")
    damaged = _damaged_in_error(error)
    if damaged is None and type(error).__name__ == "SafetensorError":
        damaged = _first_damaged_safetensors(folder) or first_line(error)
    if damaged is not None:
        return InvalidWeightsError(f"{kind} {folder}: {damaged}")
    match = re.search(
        r"no file named (\S+?),?(?: or \S+?,?)* found in directory (.+?)\.?$", text, re.M
    ) or re.search(r"(?:^|\s)(\S+) does not appear to have a file named (\S+?)\.?(?:\s|$)", text)
    components = _missing_components(folder) if isinstance(error, OSError) else []
    if match or components or isinstance(error, FileNotFoundError):
        if components:
            what = ", ".join(f"no {c}/ folder" for c in components)
            return _incomplete(kind, folder, f"{what}, which model_index.json lists", expected)
        if match and "no file named" in match.group(0):
            file, where = match.group(1), match.group(2)
        elif match:
            where, file = match.group(1), match.group(2)
        else:
            return _incomplete(kind, folder, first_line(error), expected)
        if re.fullmatch(r"(diffusion_pytorch_model|pytorch_model|model)(\.\w+)?\.(bin|safetensors)",
                        file):  # fmt: skip
            return _incomplete(kind, folder, f"no weights file in {where}", expected)
        return _incomplete(kind, folder, f"no {file} in {where}", expected)
    lines = text.strip().splitlines()
    if lines and lines[0].startswith(str(folder)):
        return InvalidWeightsError(f"{kind} {lines[0]}")  # already names the folder
    return InvalidWeightsError(f"{kind} {folder}: cannot be loaded ({first_line(error)})")


def _load_folder(
    load: Callable[..., _T],
    model: str | os.PathLike,
    kwargs: dict[str, Any],
    *,
    kind: str,
    required: Sequence[str],
    expected: str,
) -> _T:
    folder = Path(str(model))
    if not folder.is_dir():
        raise InvalidWeightsError(f"{kind} {folder}: not a folder; expected one holding {expected}")
    _check_folder(folder, kind, required, expected)
    try:
        return load(model, **kwargs)
    except RaimError:
        raise  # a component's loader already said what is wrong, in our format
    except _FOLDER_ERRORS as err:
        if type(err).__name__ == "OutOfMemoryError":
            raise
        raise _folder_error(folder, err, kind, expected) from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise _folder_error(folder, err, kind, expected) from err


# --------------------------------------------------------------------------- weights files


def _is_torchscript(file: Path) -> bool:
    try:
        with zipfile.ZipFile(file) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _read_pickle(file: Path) -> Any:
    import torch

    if zipfile.is_zipfile(file) and _is_torchscript(file):
        raise _Problem(
            "a TorchScript archive (a compiled program), not a state dict; save the network's "
            "state_dict() instead"
        )
    with warnings.catch_warnings():
        # torch's notes on pickle protocols and archive kinds; the outcome is reported below.
        warnings.simplefilter("ignore")
        try:
            return torch.load(str(file), map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):
                raise _Problem("not a PyTorch weights file, or truncated or damaged") from None
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
            what = f" ({found.group(1)})" if found else ""
            # torch's text advises loading with full unpickling: never chain it into ours.
            raise _Problem(
                f"refusing to load: the file pickles Python objects{what}, not only tensors (a "
                "whole model, or a training checkpoint with its settings); unpickling them could "
                "run code, so only torch.load(weights_only=True) checkpoints are accepted: re-save "
                "the state dict, ideally as .safetensors"
            ) from None
        except EOFError as err:
            raise _Problem("the file ends early: empty or truncated") from err
        except Exception as err:  # a damaged archive fails in torch in many ways
            text = str(err)
            if "central directory" in text or "PytorchStreamReader" in text:
                problem = "damaged or truncated (not a complete PyTorch archive)"
            else:
                problem = f"not a PyTorch weights file, or truncated or damaged ({first_line(err)})"
            if "weights_only" in text:
                raise _Problem(problem.partition(" (")[0]) from None
            raise _Problem(problem) from err


def _read_weights(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise _Problem("not a regular file")
    suffix = file.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise _Problem(
            f"unsupported weights file suffix {file.suffix!r}; use one of "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )
    if file.stat().st_size == 0:
        raise _Problem("the file is empty")
    if suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(file), device="cpu")
        except MemoryError:
            raise
        except Exception as err:  # SafetensorError, or OSError while mapping the file
            problem = f"not a valid safetensors file, or truncated ({first_line(err)})"
            raise _Problem(problem) from err
    state = _read_pickle(file)
    if not isinstance(state, dict):
        raise _Problem(
            f"holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return state


def read_weights_file(path: str | os.PathLike, *, kind: str = "weights") -> dict[str, Any]:
    """Read a ``.safetensors`` or PyTorch (``.pth``/``.pt``/``.ckpt``/``.bin``) weights file.

    PyTorch files are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings
    and containers only, never arbitrary pickled objects (which could run code on loading).

    Args:
        path (`str` or `os.PathLike`): The weights file.
        kind (`str`, *optional*, defaults to `"weights"`): What the file is, for messages
            (e.g. ``"prior"``, ``"SAM checkpoint"``).

    Returns:
        `dict`: The file's contents, on the CPU (a state dict, or a checkpoint holding one).

    Raises:
        `MissingWeightsError`: The file does not exist.
        `InvalidWeightsError`: Not a regular file, an unsupported suffix, empty, truncated,
            damaged, not weights, or a pickle of Python objects other than tensors.
    """
    file = Path(path)
    if not file.exists():
        raise MissingWeightsError(f"{kind} {file} is not available (no such file)")
    try:
        return _read_weights(file)
    except _Problem as problem:
        raise InvalidWeightsError(f"{kind} {file}: {problem}") from problem.__cause__


def extract_state_dict(
    checkpoint: Mapping[str, Any], source: str | os.PathLike, *, kind: str = "weights"
) -> dict[str, Any]:
    """The network's state dict inside ``checkpoint``.

    A plain state dict is returned as it is; a training checkpoint (optimizer state, epoch,
    ...) is searched under [`STATE_DICT_KEYS`] (``params_ema`` first), nested up to three
    levels deep.

    Args:
        checkpoint (`Mapping`): What [`read_weights_file`] returned.
        source (`str` or `os.PathLike`): The file, for messages.
        kind (`str`, *optional*, defaults to `"weights"`): What the file is, for messages.

    Returns:
        `dict`: Names to tensors.

    Raises:
        `InvalidWeightsError`: No tensors anywhere a state dict is usually kept.
    """
    import torch

    state: Mapping[str, Any] = checkpoint
    tensors: dict[str, Any] = {}
    for _ in range(4):
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(state):
            return dict(state)
        inner = next(
            (state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), Mapping) and state[k]),
            None,
        )
        if inner is None and len(state) == 1:
            only = next(iter(state.values()))
            inner = only if isinstance(only, Mapping) else None
        if inner is None:
            break
        state = inner
    if tensors:
        return tensors
    keys = [repr(k) for k in list(checkpoint)[:8]] + (["..."] if len(checkpoint) > 8 else [])
    raise InvalidWeightsError(
        f"{kind} {source}: no network weights found; the file holds {', '.join(keys) or 'nothing'}"
        f" and none of {', '.join(STATE_DICT_KEYS)} holds a state dict of tensors"
    )
