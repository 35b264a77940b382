"""Metric, seeding, atomic writes, checkpoints, command-line flags (--config files, help with defaults),
device and precision flags, palette, text tables and the submission CSV.

This module imports nothing of the toolkit's own, so every other file may use it.
"""
import argparse
import contextlib
import copy
import csv
import difflib
import json
import math
import os
import pickle
import random
import re
import socket
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.distributed as dist
import yaml

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of encoders whose weights say nothing else
IMAGENET_STD = (0.229, 0.224, 0.225)
SUBMISSION_SIZE = 256
SUBMISSION_HEADER = "image_id,PredictionString"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file; mkstemp alone would give 0600


# ---------------------------------------------------------------- user errors
class UserError(ValueError):
    """A problem with the user's input or setup, explained by its message: printed without a traceback.

    The message names the file (and id) at fault, what is wrong and what to do next.
    """


def run_main(main, parser, argv=None):
    """A script's entry point: parse the arguments (with --config, see parse_args) and run main(args).

    A UserError ends the script with its one-line message and exit status 2
    (argparse's status for bad arguments); any other exception keeps its traceback.
    """
    try:
        return main(parse_args(add_config_flag(parser), argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- atomic files
# atomic_open's temporary names: .<name>.<host>-<pid>.<mkstemp's 8 characters>.tmp
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
STALE_TEMPORARY_SECONDS = 300  # younger leftovers are left alone, whatever their pid says
_swept_folders = set()


def remove_stale_temporaries(folder):
    """Remove what killed atomic writes left in `folder`: once per process and folder.

    Only our own temporary names are touched, only those written on this host by a
    process that is no longer alive, and only when untouched for a few minutes.
    """
    if folder in _swept_folders:
        return
    _swept_folders.add(folder)
    now = time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMPORARY.match(entry.name)
            if not match or match["host"] != _HOST or _process_alive(int(match["pid"])):
                continue
            with contextlib.suppress(OSError):  # another process may sweep the same file
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_SECONDS:
                    os.remove(entry.path)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True

@contextlib.contextmanager
def atomic_open(path, mode="wb", validate=None):
    """Open a temporary file beside `path`; rename it into place only on success.

    A crash mid-write leaves the old file (or none), never a half-written one.
    `validate(tmp_path)` may raise to keep the old file when the new one is bad.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), NEW_FILE_MODE)
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def atomic_write_npy(path, array):
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def atomic_write_png(path, array, palette=None, params=()):
    """Write a uint8 image or label map as PNG; with `palette`, as a paletted PNG.

    A paletted PNG keeps the raw label values (readable with cv2.IMREAD_UNCHANGED
    or PIL) and shows the classes in colour in any image viewer. `params`: cv2
    imwrite flags for the plain PNG.
    """
    if palette is None:
        ok, buf = cv2.imencode(".png", array, list(params))
        if not ok:
            raise ValueError(f"could not encode {path} as PNG")
        atomic_write_bytes(path, buf.tobytes())
        return
    from PIL import Image  # torchvision's dependency; only paletted PNGs need it

    image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode="P")
    image.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


# ---------------------------------------------------------------- metric
class ConfusionMatrix:
    """Dataset-level confusion matrix (rows: ground truth, columns: prediction).

    Accumulated with bincount on the predictions' device; targets outside
    [0, num_classes) -- the ignore label 255 among them -- are left out.
    """

    def __init__(self, num_classes, device=None):
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target, pred):
        n = self.num_classes
        target = target.to(self.mat.device).reshape(-1).long()
        pred = pred.to(self.mat.device).reshape(-1).long()
        keep = (target >= 0) & (target < n)
        if ((pred[keep] < 0) | (pred[keep] >= n)).any():
            raise ValueError(f"prediction holds a class outside 0..{n - 1}")
        counts = torch.bincount(target[keep] * n + pred[keep], minlength=n * n)
        self.mat += counts.reshape(n, n)

    def reset(self):
        self.mat.zero_()

    def all_reduce(self):
        """Sum the matrices of all processes so every rank sees the exact total."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self):
        return scores_from_confusion(self.mat.cpu().numpy())


def scores_from_confusion(hist):
    """The competition's formulas; 0/0 classes are NaN and left out of the means."""
    hist = np.asarray(hist, dtype=np.float64)
    diag = np.diag(hist)
    gt_per_class, pred_per_class = hist.sum(1), hist.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (gt_per_class + pred_per_class - diag)
        acc_cls = diag / gt_per_class
        acc = diag.sum() / hist.sum()
    freq = gt_per_class / max(hist.sum(), 1)
    present = freq > 0
    return {
        "miou": float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan"),
        "iou": iou,
        "acc": float(acc),
        "acc_cls": float(np.nanmean(acc_cls)) if present.any() else float("nan"),
        "fwiou": float((freq[present] * iou[present]).sum()),
    }


def format_iou_table(class_names, scores):
    """Per-class IoU table, one class a line, NaN shown as '-' (class absent), then the summary scores."""
    width = max(len(name) for name in [*class_names, "mIoU"])
    return (format_class_table(class_names, [("IoU", scores["iou"])]) + "\n"
            + f"{'mIoU':<{width}}  {scores['miou']:.4f}   pixel acc {scores['acc']:.4f}   "
              f"class acc {scores['acc_cls']:.4f}   fwIoU {scores['fwiou']:.4f}")


def format_class_table(names, columns, first="class"):
    """A text table, one line per name: `columns` are (header, values) pairs, one value per name.

    Values are strings, integers, or floats shown with 4 decimals (NaN and None as '-'); columns are
    right-aligned, names left-aligned under the header `first`.
    """
    cells = [[_table_cell(value) for value in values] for _, values in columns]
    widths = [max(len(header), *(len(cell) for cell in column)) for (header, _), column in zip(columns, cells)]
    width = max(len(name) for name in [*names, first])
    rows = [(first, [header for header, _ in columns])]
    rows += [(name, [column[i] for column in cells]) for i, name in enumerate(names)]
    return "\n".join(f"{name:<{width}}" + "".join(f"  {cell:>{w}}" for cell, w in zip(row, widths))
                     for name, row in rows)


def _table_cell(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(value)
    return "-" if value is None or np.isnan(value) else f"{value:.4f}"


# ---------------------------------------------------------------- seeding
def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_worker(worker_id):
    """DataLoader worker_init_fn: numpy and random follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- checkpoints
LAST_CHECKPOINT = "last.pt"  # a run folder's latest state, to resume from
BEST_CHECKPOINT = "best.pt"  # its best validation, to predict with
# what a train.py checkpoint holds to rebuild its model anywhere (inference reads nothing else)
MODEL_KEYS = ("model", "encoder", "model_kwargs", "num_classes", "class_names", "image_size", "mean", "std",
              "state_dict")


def save_checkpoint(state, path):
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, map_location="cpu", required_keys=(), fix="pass a best.pt or last.pt that train.py wrote"):
    """Load a checkpoint of plain data only: arbitrary pickled objects are refused.

    A missing, empty, cut-short or foreign file, one holding other objects, and one without
    `required_keys` (a state dict some other program wrote) are UserErrors naming the file and `fix`.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: {fix}")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): copy it again, or {fix}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _refusal_reason(err)
        if reason is None:
            raise _unreadable(path, err, fix) from None
        raise UserError(f"checkpoint {path} cannot be loaded safely: {reason}; only tensors and plain data are read, "
                        f"since unpickling anything else can run code: {fix}") from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise _unreadable(path, err, fix) from None
    missing = [key for key in required_keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        bare = isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        what = "a bare state dict (weights without their model's description)" if bare else "not a train.py checkpoint"
        raise UserError(f"checkpoint {path} lacks {missing}: it is {what}; {fix}")
    return checkpoint


def _unreadable(path, err, fix):
    """The error for a file torch cannot read: its first sentence only (torch's advice would follow)."""
    detail = ": ".join(filter(None, [type(err).__name__, str(err).split("\n")[0].split(". ")[0].strip()]))
    return UserError(f"checkpoint {path} cannot be read: it is cut short or not a torch checkpoint ({detail}); "
                     f"copy it again, or {fix}")


def _refusal_reason(err):
    """What torch's weights_only unpickler refused, without its advice to load the file unsafely; None when
    the error is not such a refusal (a file that is no pickle at all)."""
    _, marker, reason = str(err).partition("WeightsUnpickler error:")
    if not marker or "Unsupported operand" in reason:  # an opcode no pickle holds: not a pickle at all
        return None
    return reason.strip().split("\n")[0].split(". Please use")[0]


RUN_LOCK = "run.lock"  # in a run folder while a process writes it: {"host": ..., "pid": ...}


@contextlib.contextmanager
def run_folder_lock(folder, flag="--output"):
    """Hold `folder`'s lock file while the block runs, so that two processes never write one run folder.

    The lock file is created atomically (O_EXCL) and names its holder's host and pid. A lock left by a
    process of this host that is no longer alive (killed, crashed) is taken over with a message; one of a
    live process, or of another host (whose processes this one cannot see), is a UserError naming it and
    `flag`. A folder made for the lock alone is removed with it, so a refused run leaves nothing behind.
    """
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_LOCK)
    try:
        _create_lock(path, flag)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote its files there
                os.rmdir(folder)


def _create_lock(path, flag):
    for attempt in range(2):  # a dead holder's lock is removed, then created afresh once
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
        except FileExistsError:
            host, pid = _lock_holder(path)
            if attempt or host != _HOST or _process_alive(pid):
                raise UserError(_lock_refusal(path, host, pid, flag)) from None
            print(f"taking over the lock {path} of process {pid}, which is no longer running (killed or crashed)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": _HOST, "pid": os.getpid()}, f)
        return


def _lock_holder(path):
    """(host, pid) a lock file names; (None, None) when it names none (being written, or not ours)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        host, pid = holder["host"], holder["pid"]
    except (OSError, ValueError, TypeError, KeyError):
        return None, None
    return (host, pid) if isinstance(host, str) and isinstance(pid, int) and pid > 0 else (None, None)


def _lock_refusal(path, host, pid, flag):
    folder = os.path.dirname(path)
    if host is None:
        return (f"the run folder {folder} holds a lock file {path} that names no process: delete it if no run "
                f"is writing there, or pass another {flag}")
    if host != _HOST:
        return (f"the run folder {folder} is in use by process {pid} on host {host} (lock file {path}): wait for "
                f"that run to end, or delete the lock file if it is over; or pass another {flag}")
    return (f"the run folder {folder} is in use by process {pid} of this host (lock file {path}): wait for that "
            f"run to end, or pass another {flag}; if process {pid} is no run (its pid reused), delete the lock file")


# ---------------------------------------------------------------- command-line flags, device and mixed precision
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every script's --help: its description as written, and each flag's default after its help.

    Left as they are: switches (off unless given), required flags, and helps that already say their
    default in words.
    """

    def _get_help_string(self, action):
        if action.nargs == 0 or action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


CONFIG_FLAG = "--config"


def add_config_flag(parser):
    """Give `parser` the --config flag that parse_args reads (once); returns the parser."""
    if CONFIG_FLAG not in parser._option_string_actions:
        command_line_only(parser.add_argument(
            CONFIG_FLAG, metavar="FILE", default=None,
            help="YAML or JSON file of flag values, keyed by dest (data_root) or flag name (data-root): they replace "
                 "the defaults and the command line overrides them; a run's args.json replays the run. Keys of flags "
                 "that act on one invocation only (train.py's --resume, --overwrite) are skipped"))
    return parser


def command_line_only(action):
    """Mark a flag that a --config file does not set (its key there is skipped): one that tells what to do
    with this invocation (resume, overwrite), which a replayed args.json must not repeat. Returns the action."""
    action.command_line_only = True
    return action


def parse_args(parser, argv=None):
    """parser.parse_args(argv), the file of --config FILE (when given) setting the defaults first.

    The file maps flag names to values. A value is parsed by its flag's own rules (type, choices,
    number of values), as if typed on the command line, unless the command line gives the flag too:
    the command line wins, so a value valid only elsewhere (--device cuda:0 in a GPU run's args.json)
    can be overridden. null stands for a flag whose default is None (not given). Unknown keys are refused.
    """
    path = _config_path(argv)
    if path is None:
        return parser.parse_args(argv)
    for owner, action, value in _config_values(parser, read_config(path), path):
        owner.set_defaults(**{action.dest: value})
        action.required = False  # given by the file
    args = parser.parse_args(argv)
    for dest, value in vars(args).items():
        if isinstance(value, _ConfigValue):  # not overridden on the command line
            setattr(args, dest, value.parse())
    return args


def _config_path(argv):
    """The FILE of --config in argv, read as the script's parser reads it (prefixes too); None without one.

    A malformed --config (no value) is left for the script's parser to report.
    """
    finder = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    finder.add_argument(CONFIG_FLAG)
    try:
        return finder.parse_known_args(argv)[0].config
    except argparse.ArgumentError:
        return None


def read_config(path):
    """A --config file's {key: value}: JSON when its name ends in .json, else YAML (an empty file: {})."""
    kind = "JSON" if path.lower().endswith(".json") else "YAML"
    try:
        with open(path) as f:
            values = json.load(f) if kind == "JSON" else yaml.safe_load(f)
    except OSError as err:
        raise UserError(f"--config {path} cannot be read ({err.strerror}): pass a YAML or JSON file of flag "
                        f"values") from None
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"--config {path} is not valid {kind}: {' '.join(str(err).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} holds a {type(values).__name__}, not a mapping of flag names to values "
                        f"(one 'size: 512' a line)")
    return values


def _config_values(parser, values, path):
    """(parser, action, _ConfigValue) to set as defaults, a subcommand's flags included; an unknown key, a
    positional argument or a flag set twice is a UserError naming the file and the key."""
    index, keys_of = _flag_index(parser), {}
    for key, value in values.items():
        owners = index.get(key)
        if owners is None:
            raise UserError(f"--config {path}: unknown key {key!r}: {parser.prog} has no such flag; "
                            + _closest_flag(str(key), index, parser.prog))
        for owner, action in owners:
            if getattr(action, "command_line_only", False):
                continue
            if not action.option_strings:
                raise UserError(f"--config {path}: {key!r} is the positional argument {action.dest.upper()} of "
                                f"{owner.prog}: give it on the command line and drop it from the file")
            if id(action) in keys_of:
                raise UserError(f"--config {path}: keys {keys_of[id(action)]!r} and {key!r} both set "
                                f"{action.option_strings[-1]}: keep one of them")
            keys_of[id(action)] = key
            yield owner, action, _ConfigValue(path, key, value, action)


def _flag_index(parser):
    """{key: [(parser, action)]}: each flag under its dest and its dashed dest, subcommands' flags included."""
    index = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(sub): sub for sub in action.choices.values()}.values():  # aliases name one parser
                for key, owners in _flag_index(sub).items():
                    index.setdefault(key, []).extend(owners)
        elif action.default is not argparse.SUPPRESS:  # -h and --version set nothing
            for key in dict.fromkeys([action.dest, action.dest.replace("_", "-")]):
                index.setdefault(key, []).append((parser, action))
    return index


def _closest_flag(key, index, prog):
    """'did you mean ...' for a mistyped config key (difflib), or where to look."""
    match = difflib.get_close_matches(key, index, n=1)
    if not match:
        return f"see {prog} --help for its flags"
    action = index[match[0]][0][1]
    return f"did you mean {match[0]!r} ({action.option_strings[-1] if action.option_strings else action.dest})?"


class _ConfigValue:
    """A --config file's value of one flag, a parser's default until parse() turns it into the flag's value."""

    def __init__(self, path, key, value, action):
        self.path, self.key, self.value, self.action = path, key, value, action
        self.default = action.default  # before set_defaults replaces it with this object

    def __str__(self):  # what --help shows as the default
        return str(self.value)

    def parse(self):
        """The value as the command line would give it; a UserError naming the file, the key and the flag."""
        action, value, flag = self.action, self.value, self.action.option_strings[-1]
        if value is None and self.default is None:
            return None
        if value is None:
            problem = f"null, but {flag} takes a value (default {self.default!r})"
        elif action.nargs == 0:  # a switch: the file says whether it is on, as the dest reads
            if type(value) is bool and value in (self.default, action.const):
                return value
            problem = f"{value!r}, but {flag} is a switch: true or false"
        else:
            try:
                return getattr(_FlagParser(action).parse_args(_flag_tokens(flag, value)), action.dest)
            except ValueError as err:
                problem = str(err)
                if isinstance(value, bool):
                    problem += " (YAML reads yes, no, on and off as true and false: quote the value)"
        raise UserError(f"--config {self.path}: key {self.key!r}: {problem}; fix or remove it in the file, or give "
                        f"{flag} on the command line")


class _FlagParser(argparse.ArgumentParser):
    """A parser of one flag whose errors are raised as ValueErrors, not printed with an exit."""

    def __init__(self, action):
        super().__init__(add_help=False, allow_abbrev=False)
        self._add_action(copy.copy(action))  # the script's parser keeps its own

    def error(self, message):
        raise ValueError(message)


def _flag_tokens(flag, value):
    """The command-line words that give `flag` this value: a list as several words."""
    if isinstance(value, dict):
        raise ValueError(f"a mapping ({value!r}) is no flag value")
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [f"{flag}={value}"]


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def number_in(low, high=math.inf, low_open=False, high_open=False):
    """argparse type: a finite number in [low, high] ('(' / ')' where low_open / high_open)."""
    if high == math.inf:
        bounds = f"above {low}" if low_open else f"{low} or more"
    else:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def number(text):
        value = float(text)
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value
    return number


positive_float = number_in(0, low_open=True)
non_negative_float = number_in(0)
probability = number_in(0, 1)


def available_device(text):
    """argparse type: a torch device name that this machine has (cuda, cuda:N need a GPU and GPU N).

    Returns the name itself, so args stay plain data.
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here: pass --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    return text


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_args(parser, amp_help="mixed precision"):
    """--device (default: cuda when there is one) and, unless amp_help is None, --amp."""
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    if amp_help is not None:
        parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help=amp_help)


def autocast(device, amp):
    """The autocast context --amp asks for on `device` ("off": a context that changes nothing)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------- palette
_BASE_PALETTE = [
    (0, 0, 0), (192, 0, 128), (0, 128, 192), (0, 128, 64), (128, 0, 0), (64, 0, 128),
    (64, 0, 192), (192, 128, 64), (192, 192, 128), (64, 64, 128), (128, 0, 192),
]


def class_palette(num_classes):
    """RGB colour per class: fixed colours for the first 11, seeded ones after."""
    rng = np.random.default_rng(0)
    extra = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(max(0, num_classes - len(_BASE_PALETTE)))]
    return np.array((_BASE_PALETTE + extra)[:num_classes], dtype=np.uint8)


def label_palette(num_classes):
    """All 256 entries (a paletted PNG stays 8 bits deep, so 255 survives); 255 and unused are white."""
    palette = np.full((256, 3), 255, dtype=np.uint8)
    palette[:num_classes] = class_palette(num_classes)
    return palette


def colorize(mask, num_classes):
    """Label map -> RGB image; ignored pixels (255) are white."""
    return label_palette(num_classes)[mask]


def overlay(image_rgb, mask, num_classes, alpha=0.5):
    """The label colours blended into the image; background pixels (0) keep the image's own."""
    colour = colorize(mask, num_classes)
    blended = image_rgb.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha
    return np.where((mask == 0)[..., None], image_rgb, blended.astype(np.uint8))


STRIP_ROW, STRIP_SWATCH, STRIP_GAP, STRIP_FONT_SCALE = 16, 10, 12, 0.4  # pixels and cv2 font scale at scale 1
STRIP_BACKGROUND = 32  # dark grey, under white text


def legend_strip(class_names, width, scale=1):
    """An RGB strip `width` wide naming each class's colour, in as many rows as the names need.

    Background is left out: its pixels keep the image's own colours. `scale` multiplies every size.
    """
    row_height, swatch, gap, font = (round(v * scale) for v in (STRIP_ROW, STRIP_SWATCH, STRIP_GAP, 1))
    palette, items, x, row = class_palette(len(class_names)), [], gap // 2, 0
    for label, name in enumerate(class_names[1:], 1):
        text_width = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, STRIP_FONT_SCALE * scale, font)[0][0]
        item_width = swatch + 4 * font + text_width
        if items and x + item_width > width:
            x, row = gap // 2, row + 1
        items.append((label, name, x, row * row_height))
        x += item_width + gap
    strip = np.full(((row + 1) * row_height, width, 3), STRIP_BACKGROUND, np.uint8)
    for label, name, x, y in items:
        top = y + (row_height - swatch) // 2
        cv2.rectangle(strip, (x, top), (x + swatch - 1, top + swatch - 1), tuple(int(v) for v in palette[label]),
                      thickness=-1)
        cv2.putText(strip, name, (x + swatch + 4 * font, y + row_height - 4 * font), cv2.FONT_HERSHEY_SIMPLEX,
                    STRIP_FONT_SCALE * scale, (255, 255, 255), font, cv2.LINE_AA)
    return strip


def title_strip(text, width, scale=1):
    """An RGB strip `width` wide with `text` on one line, white on dark grey; cut with '...' to fit."""
    row_height, margin, font = (round(v * scale) for v in (STRIP_ROW, STRIP_GAP // 2, 1))
    while len(text) > 3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, STRIP_FONT_SCALE * scale,
                                            font)[0][0] > width - 2 * margin:
        text = text[:-4] + "..."
    strip = np.full((row_height, width, 3), STRIP_BACKGROUND, np.uint8)
    cv2.putText(strip, text, (margin, row_height - 4 * font), cv2.FONT_HERSHEY_SIMPLEX, STRIP_FONT_SCALE * scale,
                (255, 255, 255), font, cv2.LINE_AA)
    return strip


def explained_panel(image_rgb, masks, class_names, title):
    """overlay_panel under a title and above a legend, so the picture explains itself outside the toolkit.

    The strips grow with the panel (one size step per 640 pixels of width), to stay readable on large photos.
    """
    panel = overlay_panel(image_rgb, masks, len(class_names))
    scale = max(1, panel.shape[1] // 640)
    return np.concatenate([title_strip(title, panel.shape[1], scale), panel,
                           legend_strip(class_names, panel.shape[1], scale)])


def overlay_panel(image_rgb, masks, num_classes):
    """The image | one overlay per label map (ground truth, prediction, ...), side by side; RGB uint8."""
    return np.concatenate([image_rgb] + [overlay(image_rgb, mask, num_classes) for mask in masks], axis=1)


# ---------------------------------------------------------------- submission CSV
def resize_for_submission(mask, size=SUBMISSION_SIZE):
    """Nearest-neighbour resize, the same call albumentations' Resize makes for masks."""
    return cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8), (size, size),
                      interpolation=cv2.INTER_NEAREST)


def write_submission(path, rows, num_classes, expected_ids=None, size=SUBMISSION_SIZE):
    """Write `(file_name, mask of any size)` rows; validated before replacing `path`.

    A file name holding a comma, a quote or a line break is quoted as CSV quotes it (pandas and
    read_submission read it back); other rows are written as they are.
    """
    def validate(tmp):
        try:
            read_submission(tmp, num_classes, expected_ids=expected_ids, size=size)
        except ValueError as err:  # name the file the user asked for, not the deleted temporary one
            raise ValueError(str(err).replace(tmp, os.fspath(path))) from None

    with atomic_open(path, "w", validate=validate) as f:
        f.write(SUBMISSION_HEADER + "\n")
        writer = csv.writer(f, lineterminator="\n")
        for file_name, mask in rows:
            writer.writerow([file_name, " ".join(map(str, resize_for_submission(mask, size).ravel().tolist()))])


def read_submission(path, num_classes, expected_ids=None, size=SUBMISSION_SIZE):
    """Read and check a submission CSV; returns {image_id: size x size uint8 mask}.

    Raises ValueError naming the file, the line and what is wrong.
    """
    masks = {}
    _allow_csv_fields(size * size * 16)  # room for any integers the values may be, so the checks below name them
    with open(path, newline="") as f:
        records = _numbered(csv.reader(f), path)
        _, header = next(records, (1, []))
        if header != SUBMISSION_HEADER.split(","):
            raise ValueError(f"{path}: header is {','.join(header)!r}, expected {SUBMISSION_HEADER!r}")
        for line_no, record in records:
            if len(record) < 2:
                raise ValueError(f"{path}:{line_no}: no comma between image_id and PredictionString")
            if len(record) > 2:
                raise ValueError(f"{path}:{line_no}: {len(record)} fields, expected 2: quote an image_id holding "
                                 f"a comma")
            image_id, values = record
            if image_id in masks:
                raise ValueError(f"{path}:{line_no}: image {image_id} appears twice")
            masks[image_id] = _parse_prediction(values, num_classes, size, f"{path}:{line_no} ({image_id})")
    if expected_ids is not None:
        missing = sorted(set(expected_ids) - set(masks))
        extra = sorted(set(masks) - set(expected_ids))
        if missing or extra:
            raise ValueError(f"{path}: {len(missing)} test images missing (e.g. {missing[:3]}), "
                             f"{len(extra)} unexpected (e.g. {extra[:3]})")
    return masks


def _numbered(records, path):
    """(line number, record) of a csv.reader; its errors (a field over the limit...) as ValueErrors naming the line."""
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValueError(f"{path}:{records.line_num}: {err}") from None
        yield records.line_num, record


def _allow_csv_fields(chars):
    """Raise the csv module's field limit (128 KiB by default) to `chars` if it is lower."""
    if csv.field_size_limit() < chars:
        csv.field_size_limit(chars)


def _parse_prediction(text, num_classes, size, where):
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"{where}: PredictionString holds a value that is not an integer") from None
    if values.size != size * size:
        raise ValueError(f"{where}: {values.size} values, expected {size * size}")
    if values.min() < 0 or values.max() >= num_classes:
        raise ValueError(f"{where}: values span {values.min()}..{values.max()}, expected 0..{num_classes - 1}")
    return values.reshape(size, size).astype(np.uint8)
