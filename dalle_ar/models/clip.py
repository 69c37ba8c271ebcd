"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") as transformers' `CLIPModel`: built here from a config our YAML sizes, over the
project's own BPE tokenizer, and saved as an ordinary Hugging Face folder, so that one loader reads
both ours and a user's own (openai or LAION checkpoints converted to Hugging Face, on disk).
Our folders load in plain transformers too, but their text must be pooled as `text_embeds` does
(their EOS id is 2: CLIPModel's own `get_text_features` would pool at the wrong token).

A CLIP folder holds `config.json` and `model.safetensors` (CLIPModel), the tokenizer's files
(`tokenizer.json`, `tokenizer_config.json`: `AutoTokenizer`) and `preprocessor_config.json`
(`CLIPImageProcessor` settings, which resize and normalise our images; read by transformers'
PIL backend, `CLIPImageProcessorPil`, the class transformers falls back to, with a warning,
without torchvision). No pickle is ever loaded.

Traps of CLIPModel this module steps around:
- The text is pooled at the first end-of-text token, read from the folder's tokenizer; CLIPModel
  itself takes the arg-max id instead when `eos_token_id == 2` (its legacy path), which is our
  tokenizer's EOS. Every encoded caption must hold one: a caption cut before it is refused.
- Features are projected but not normalised; `image_embeds` / `text_embeds` return unit vectors.
- The learned temperature starts at ln(1/0.07) (`logit_scale_init_value`, CLIPConfig's default)
  and is clamped at ln(100) by the training recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
)

from dalle_ar.checkpoint import file_sha256
from dalle_ar.config import ConfigError, require, require_fits_memory
from dalle_ar.data.shards import caption_chars
from dalle_ar.runtime import values_by_depth
from dalle_ar.text import TextTokenizer

LOGIT_SCALE_MAX = math.log(100.0)  # the clamp of the learned temperature (the paper's)
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a tokenizer.json tokenizer, in 4.x and 5.x
# What a CLIP folder must hold, and which part of it each file is.
FOLDER_FILES = {
    "config.json": "the model config",
    "model.safetensors": "the weights (safetensors)",
    "tokenizer_config.json": "the tokenizer",
    "preprocessor_config.json": "the image processor",
}


def check_clip_folder(folder: str | Path) -> Path:
    """`folder` as a Path; FileNotFoundError naming each part (`FOLDER_FILES`) it lacks."""
    folder = Path(folder)
    missing = [f"{name} ({what})" for name, what in FOLDER_FILES.items()
               if not (folder / name).is_file()]  # fmt: skip
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete CLIP folder: no {', '.join(missing)}")
    return folder


@dataclasses.dataclass
class CLIPSizes:
    """The sizes of a CLIP built here (`configs/<data>/clip.yaml`, key `model`). The text side's
    vocabulary, length and special tokens come from the tokenizer."""

    image_size: int = 32  # pixels a side; the image processor resizes to it
    patch_size: int = 4  # ViT patch, pixels a side
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 3
    embed_dim: int = 128  # the joint embedding (projection_dim)
    text_len: int = 0  # text positions; 0 = the tokenizer's text_len
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        require(self.image_size >= 8, "image_size", "must be >= 8")
        require(
            self.patch_size >= 1 and self.image_size % self.patch_size == 0,
            "patch_size",
            f"must divide image_size={self.image_size}, got {self.patch_size}",
        )
        for side in ("vision", "text"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            require(heads >= 1 and width % heads == 0, f"{side}_heads",
                    f"must divide {side}_width={width}, got {heads}")  # fmt: skip
            require(getattr(self, f"{side}_layers") >= 1, f"{side}_layers", "must be >= 1")
        require(self.embed_dim >= 1, "embed_dim", "must be >= 1")
        require(self.text_len == 0 or self.text_len >= 2, "text_len",
                f"must be 0 (the tokenizer's) or >= 2, got {self.text_len}")  # fmt: skip

    def check_fits_memory(self, prefix: str = "", values: int | None = None) -> None:
        """ConfigError naming the likely field when the CLIP of these sizes could not be held in
        this machine's memory (`config.require_fits_memory`); called where one is built here (the
        recipe's start, a folder's load), not by `validate`. `values`: the CLIP's numbers when
        known (a folder's config: `clip_values`); else counted over a one-id vocabulary, the
        tokenizer's rows (vocab x text_width) being small beside the towers."""
        if values is None:
            stand_in = _Vocabulary(self.text_len or 2)
            values = clip_values(clip_config(self, stand_in))  # type: ignore[arg-type]
        # (not patch_size: a larger patch makes a smaller model)
        sizes = tuple(f.name for f in dataclasses.fields(self) if f.name != "patch_size")
        require_fits_memory(self, values, "a CLIP", sizes, prefix)

    @classmethod
    def of(cls, config: CLIPConfig) -> CLIPSizes:
        """The sizes of a CLIPConfig (ours or a user's), as far as these fields describe it
        (`mlp_ratio`: the vision tower's)."""
        t, v = config.text_config, config.vision_config
        towers = {f"{side}_{ours}": getattr(c, theirs) for side, c in (("text", t), ("vision", v))
                  for ours, theirs in TOWER_KEYS.items()}  # fmt: skip
        return cls(image_size=v.image_size, patch_size=v.patch_size,
                   embed_dim=config.projection_dim, text_len=t.max_position_embeddings,
                   mlp_ratio=v.intermediate_size / v.hidden_size, **towers)  # fmt: skip


# CLIPSizes' names for a tower's keys in transformers' CLIPTextConfig / CLIPVisionConfig
TOWER_KEYS = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads"}


class _Vocabulary:
    """A one-id stand-in tokenizer of `text_len` positions, for counting a CLIP's numbers before
    its tokenizer is read (`CLIPSizes.check_fits_memory`)."""

    vocab_size, pad_id, bos_id, eos_id = 1, 0, 0, 0

    def __init__(self, text_len: int) -> None:
        self.text_len = text_len


def clip_values(config: CLIPConfig) -> int:
    """The numbers of `CLIPModel(config)`, counted on the meta device, nothing allocated
    (`runtime.values_by_depth` over both towers' layers)."""

    def build(text: int, vision: int) -> CLIPModel:
        c = config.to_dict()
        c["text_config"]["num_hidden_layers"] = text
        c["vision_config"]["num_hidden_layers"] = vision
        return CLIPModel(CLIPConfig(**c))

    t, v = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    return values_by_depth(build, text=t, vision=v)


def clip_config(sizes: CLIPSizes, tokenizer: TextTokenizer) -> CLIPConfig:
    """The `CLIPConfig` of a CLIP over `tokenizer` (its vocab, special ids and, unless
    `sizes.text_len` says otherwise, text_len)."""
    sizes.validate()

    def tower(side: str) -> dict[str, int]:  # the transformer of one side: text or vision
        width = getattr(sizes, f"{side}_width")
        return {**{theirs: getattr(sizes, f"{side}_{ours}") for ours, theirs in TOWER_KEYS.items()},
                "intermediate_size": int(width * sizes.mlp_ratio),
                "projection_dim": sizes.embed_dim}  # fmt: skip

    text = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=sizes.text_len or tokenizer.text_len,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        **tower("text"),
    )
    vision = CLIPVisionConfig(
        image_size=sizes.image_size, patch_size=sizes.patch_size, **tower("vision")
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=sizes.embed_dim
    )


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Shorter side resized (bicubic) to image_size, centre-cropped to a square of it (a no-op
    for square images), CLIP's mean and std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def text_embeds(
    model: CLIPModel, ids: torch.Tensor, mask: torch.Tensor, eos_id: int
) -> torch.Tensor:
    """Unit text embeddings (N, embed_dim), float32: ids and mask (N, L) through the text tower,
    pooled at each row's first `eos_id` (not CLIPModel's own pooling: see the module docstring)."""
    hidden = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    at = (ids == eos_id).int().argmax(1)
    pooled = hidden[torch.arange(len(ids), device=ids.device), at]
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


def image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings (N, embed_dim), float32, from pixel values (N, 3, S, S)."""
    out = model.vision_model(pixel_values=pixel_values)
    return F.normalize(model.visual_projection(out.pooler_output).float(), dim=-1)


def clip_score(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021, without its w = 2.5 scale; torchmetrics' `clip_score`
    scales it the same way): 100 x the cosine of each unit image embedding (N, D) with its unit
    text embedding (N, D), each floored at 0 as Hessel et al. do (torchmetrics floors the
    mean); (N,) float32 on `image`'s device."""
    return (100 * (text.to(image.device) * image).sum(-1)).clamp(min=0)


# Config keys that a save and load add or change without changing the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "_name_or_path",
                        "architectures")  # fmt: skip


def _stable(conf: dict) -> dict:
    """A config dict without `VOLATILE_CONFIG_KEYS`, at every level."""
    return {k: _stable(v) if isinstance(v, dict) else v for k, v in conf.items()
            if k not in VOLATILE_CONFIG_KEYS}  # fmt: skip


class CLIPPair(nn.Module):
    """CLIPModel as trained: forward(ids, mask, pixel_values) -> (image embeds, text embeds,
    logit scale), one call through DDP's wrapper for both towers."""

    def __init__(self, clip: CLIPModel, eos_id: int) -> None:
        super().__init__()
        self.clip, self.eos_id = clip, eos_id

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor):
        img = image_embeds(self.clip, pixel_values)
        return img, text_embeds(self.clip, ids, mask, self.eos_id), self.clip.logit_scale


class CLIP:
    """A CLIPModel with the tokenizer and image processor of its folder.

    model: CLIPModel; tokenizer: a transformers tokenizer whose encoding of a caption ends in
    its EOS token; processor: CLIPImageProcessorPil.
    """

    def __init__(self, model: CLIPModel, tokenizer, processor: CLIPImageProcessorPil) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the CLIP tokenizer has no eos_token: the text cannot be pooled")
        self.text_len = model.config.text_config.max_position_embeddings
        self.too_long = 0  # captions the last `encode_text(truncate=True)` cut
        self._identity: dict[str, str | int] | None = None  # `identity()`, once computed
        self.folder: Path | None = None  # the folder it was loaded from; None when built
        self._file_sha256: str | None = None  # `file_sha256`, once computed

    @classmethod
    def build(cls, sizes: CLIPSizes, tokenizer: TextTokenizer, seed: int = 0) -> CLIP:
        """A new CLIP over the project's tokenizer, initialised from `seed`."""
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(sizes, tokenizer))
        return cls(model, tokenizer.hf, image_processor(sizes.image_size))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> CLIP:
        """Load a Hugging Face CLIP folder (ours or a user's). FileNotFoundError names each
        missing part (`FOLDER_FILES`); ConfigError for sizes this machine's memory could not
        hold (`CLIPSizes.check_fits_memory`), before the model is built."""
        folder = check_clip_folder(folder)
        config = CLIPConfig.from_pretrained(str(folder))
        try:  # before anything is allocated
            CLIPSizes.of(config).check_fits_memory(values=clip_values(config))
        except ConfigError as e:
            where = folder / "config.json"
            raise ConfigError(f"{where} (sizes as clip.yaml names them): {e}") from None
        model = CLIPModel.from_pretrained(str(folder), config=config, use_safetensors=True)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        processor = CLIPImageProcessorPil.from_pretrained(str(folder))
        clip = cls(model, tokenizer, processor)
        clip.folder = folder
        return clip

    @property
    def file_sha256(self) -> str | None:
        """The content hash of the model.safetensors of the folder it was loaded from
        (`checkpoint.file_sha256`), read on first use, so read it while the folder is as it was
        loaded: what says, without loading the folder, that it holds these weights (the token
        shards with its embeddings record it); None for a CLIP built here. FileNotFoundError
        when the file is gone."""
        if self._file_sha256 is None and self.folder is not None:
            self._file_sha256 = file_sha256(self.folder / "model.safetensors")
        return self._file_sha256

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder `from_pretrained` reads (safetensors weights). A fast tokenizer is
        named by the class every transformers release since 4.x knows (`FAST_TOKENIZER_CLASS`;
        5.x writes "TokenizersBackend", which 4.x cannot load)."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        self.processor.save_pretrained(str(folder))
        f = Path(folder) / "tokenizer_config.json"
        meta = json.loads(f.read_text())
        if meta.get("tokenizer_class") == "TokenizersBackend":
            meta["tokenizer_class"] = FAST_TOKENIZER_CLASS
            f.write_text(json.dumps(meta, indent=2))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        """D: the size of the image and text embeddings."""
        return int(self.model.config.projection_dim)

    def identity(self) -> dict[str, str | int]:
        """Which CLIP this is, for what is trained on its embeddings (the prior, token shards,
        an embedding-conditioned transformer): {"config_sha256", "weights_sha256", "embed_dim"}.
        The config hash reads the model config as JSON (sorted keys, without what saving and
        loading change: `VOLATILE_CONFIG_KEYS`); the weights hash every tensor's name, dtype,
        shape and bytes in name order. Computed once per object (hashing a large CLIP takes
        seconds): the weights of a loaded CLIP do not change; a recipe that trains one builds
        the folder's CLIP anew to save it."""
        if self._identity is not None:
            return self._identity
        conf = _stable(self.model.config.to_dict())
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._identity = {
            "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": h.hexdigest(),
            "embed_dim": self.embed_dim,
        }
        return self._identity

    def to(self, device: str | torch.device) -> CLIP:
        self.model.to(device)
        return self

    def encode_text(
        self, prompts: Sequence[str], truncate: bool = False, longest: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (N, text_len), int64, for the prompts (with `longest`,
        (N, L) padded only to the longest prompt: the same embeddings for less work, the text
        tower being causal and pooled at each EOS). ValueError names a
        prompt whose encoding is longer than text_len (a fast tokenizer would cut it silently and
        still end it in EOS) unless `truncate` (training: cut to text_len, ending in EOS, as
        open_clip's tokenizer does; `too_long` counts them), or one that holds no EOS (it would
        be pooled at a word, not at its end)."""
        # cut by characters first: a megabyte caption would cost a megabyte of tokens, twice
        prompts = [p[: caption_chars(self.text_len)] for p in prompts]
        # measured here, said below: transformers' own over-length warning would repeat it
        lengths = [len(x) for x in self.tokenizer(prompts, verbose=False)["input_ids"]]
        long = [(p, n) for p, n in zip(prompts, lengths) if n > self.text_len]
        if long and not truncate:
            prompt, n = long[0]
            raise ValueError(f"the CLIP tokenizer encodes {prompt!r} in {n} tokens, more than "
                             f"the model's {self.text_len}")  # fmt: skip
        self.too_long = len(long)
        enc = self.tokenizer(prompts, padding="longest" if longest else "max_length",
                             max_length=self.text_len, truncation=truncate,
                             return_tensors="pt")  # fmt: skip
        ids, mask = enc["input_ids"], enc["attention_mask"]
        has_eos = (ids == self.eos_id).any(1)
        if not bool(has_eos.all()):
            bad = prompts[int((~has_eos).nonzero()[0])]
            raise ValueError(f"the CLIP tokenizer encodes {bad!r} without its end-of-text token")
        return ids, mask

    def text_embeds(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings (N, embed_dim), float32, pooled at each caption's first EOS."""
        return text_embeds(self.model, ids.to(self.device), mask.to(self.device), self.eos_id)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's pixel values (N, 3, S, S), float32, for RGB PIL images."""
        out = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"]

    def pixels_from_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (the data loader's, the VQ decoder's) -> pixel values
        (B, 3, S, S) on their device, as the folder's processor makes them: resized (shorter side
        to `size["shortest_edge"]`, or to `size`'s height and width), centre-cropped to
        `crop_size`, normalised with its mean and std, each step only where the processor does
        it. torch's bicubic kernel (antialiased) is not PIL's, so this and `pixels` differ
        slightly where a resize happens."""
        p = self.processor
        x = images.float()
        if p.do_resize:
            h, w = x.shape[-2:]
            if "shortest_edge" in p.size:
                e = p.size["shortest_edge"]
                # the longer side floored, as transformers' get_resize_output_image_size does
                out = (e, max(1, int(w * e / h))) if h <= w else (max(1, int(h * e / w)), e)
            else:
                out = (p.size["height"], p.size["width"])
            if tuple(out) != (h, w):
                x = F.interpolate(x, size=out, mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)  # fmt: skip
        if p.do_center_crop:
            ch, cw = p.crop_size["height"], p.crop_size["width"]
            ph, pw = max(0, ch - x.shape[-2]), max(0, cw - x.shape[-1])
            if ph or pw:  # smaller than the crop: padded with zeros, as the processor does
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if p.do_normalize:
            mean = x.new_tensor(p.image_mean)[:, None, None]
            std = x.new_tensor(p.image_std)[:, None, None]
            x = (x - mean) / std
        return x

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings (N, embed_dim), float32, from `pixels`."""
        return image_embeds(self.model, pixel_values.to(self.device))

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        """CLIPScore (Hessel et al. 2021, without its w = 2.5 scale): 100 x the cosine of each
        image with its prompt, floored at 0; (N,) float32 on the CPU. ValueError for lengths that
        differ or a prompt the tokenizer cannot encode (before any image is processed)."""
        if len(images) != len(prompts):
            raise ValueError(f"score needs one prompt per image, got {len(images)} images and "
                             f"{len(prompts)} prompts")  # fmt: skip
        ids, mask = self.encode_text(prompts)
        out = []
        for i in range(0, len(images), batch_size):
            t = self.text_embeds(ids[i : i + batch_size], mask[i : i + batch_size])
            v = self.image_embeds(self.pixels(images[i : i + batch_size]))
            out.append(clip_score(v, t).cpu())
        return torch.cat(out) if out else torch.zeros(0)


class CLIPImageFeatures(nn.Module):
    """A CLIP's image tower as a feature extractor (torchmetrics' `FrechetInceptionDistance`
    takes one as `feature`): images (N, 3, H, W), float in [0, 1] -> unit image embeddings
    (N, D), float32, as `CLIP.image_embeds` of `CLIP.pixels_from_tensor` gives them.
    `num_features` = D spares torchmetrics a dummy forward pass."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip  # not a submodule: the CLIP's weights stay its own
        self.num_features = clip.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images (N, 3, H, W) in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")  # fmt: skip
        # on the images' device: torchmetrics keeps the metric's sums where the images are
        return self.clip.image_embeds(self.clip.pixels_from_tensor(images)).to(images.device)
