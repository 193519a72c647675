"""The ``adapters`` component of AGD pipelines: loading and saving guidance adapters with a pipeline folder.

Imports only diffusers. A saved folder holds ``adapters/`` (weights, ``config.json`` and the adapters'
single source file ``guidance_adapters.py``) and names it in ``model_index.json`` as
``["guidance_adapters", "GuidanceAdapters"]``, so ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads the adapters with diffusers alone.
"""

import inspect
import json
import os
import shutil

ADAPTERS_FILE = "guidance_adapters.py"
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class AdaptersComponentMixin:
    """``from_pretrained`` / ``save_pretrained`` for a pipeline with an optional ``adapters`` component."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved folder into ``cls`` (any component, ``adapters`` included, may be passed instead).

        The adapters' class comes from an installed ``stepdistill``; without it, pass
        ``trust_remote_code=True`` to import the folder's ``adapters/guidance_adapters.py``.
        """
        path = pretrained_model_name_or_path
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = cls.load_config(path, **hub_kwargs)
        adapters = kwargs.pop("adapters", None)
        if adapters is None and (config.get("adapters") or [None])[0] is not None:
            adapters_cls = adapters_class(path, trust_remote_code, hub_kwargs)
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            options = {**hub_kwargs, **({"dtype": dtype} if dtype is not None else {})}
            adapters = adapters_cls.from_pretrained(path, subfolder="adapters", **options)
        return cls._load_with_adapters(path, adapters, config, **kwargs)

    @classmethod
    def _load_with_adapters(cls, path, adapters, config: dict, **kwargs):
        """The other components from ``path``, with ``adapters`` passed to ``__init__``."""
        return super().from_pretrained(path, adapters=adapters, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as diffusers does, plus this file and the adapters' source file, so that the folder loads
        with ``trust_remote_code=True`` (the pipeline's own file, which imports this one, is the caller's)."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, os.path.basename(__file__)))
        if self.adapters is None:
            return
        source = inspect.getsourcefile(type(self.adapters))
        shutil.copyfile(source, os.path.join(save_directory, "adapters", ADAPTERS_FILE))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["adapters"] = [ADAPTERS_FILE[:-3], type(self.adapters).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def adapters_class(path, trust_remote_code: bool, hub_kwargs: dict):
    """``GuidanceAdapters`` from an installed stepdistill, else from the folder's own file (remote code)."""
    try:
        from stepdistill.guidance_adapters import GuidanceAdapters

        return GuidanceAdapters
    except ImportError:
        pass
    if not trust_remote_code:
        raise ValueError(
            "the adapters' class ships in the folder: pass trust_remote_code=True (or adapters=...)."
        )
    from diffusers.utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(
        str(path), ADAPTERS_FILE, subfolder="adapters", class_name="GuidanceAdapters",
        trust_remote_code=True, **hub_kwargs,
    )  # fmt: skip
