"""CLIP as transformers' CLIPModel: built over the project's tokenizer, saved as a Hugging Face
folder, loaded back (ours and a user's own folder), scored in the CLIPScore convention."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPModel, PreTrainedTokenizerFast

from dalle_ar.models.clip import CLIP, CLIPSizes, image_processor
from dalle_ar.text import TokenizerConfig, train_tokenizer

TINY = CLIPSizes(image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
                 text_width=32, text_layers=1, text_heads=2, embed_dim=16)  # fmt: skip
IMAGES = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))]
PROMPTS = ["a small red circle", "a big blue square"]


@pytest.fixture(scope="module")
def ours(shapes_captions):
    tok = train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=16))
    return CLIP.build(TINY, tok), tok


def test_our_clip_round_trips_as_a_hugging_face_folder(ours, tmp_path):
    clip, tok = ours
    assert clip.model.config.text_config.eos_token_id == tok.eos_id
    scores = clip.score(IMAGES, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 100)).all())
    clip.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "clip" / "tokenizer_config.json").read_text())
    assert meta["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class transformers 4.x knows
    back = CLIP.from_pretrained(tmp_path / "clip")
    assert torch.allclose(back.score(IMAGES, PROMPTS), scores, atol=1e-5)
    # the processor is read by the PIL backend itself: no fallback warning on every load (a
    # fresh process: transformers warns once per process)
    load = (
        f"from dalle_ar.models.clip import CLIP; CLIP.from_pretrained({str(tmp_path / 'clip')!r})"
    )
    run = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert run.returncode == 0 and "torchvision" not in run.stderr, run.stderr
    saved = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor"  # what other tools read


def test_text_is_pooled_at_the_end_of_text_token(ours):
    clip, tok = ours
    assert tok.eos_id == 2  # the id at which CLIPModel's own pooling takes the arg-max id instead
    ids, mask = clip.encode_text(["a small red circle"])
    end = int((ids[0] == tok.eos_id).nonzero()[0])
    base = clip.text_embeds(ids, mask)
    after, before = ids.clone(), ids.clone()
    after[0, end + 1] = 250  # a word after the end: masked out, never pooled
    before[0, end - 1] = 250  # a word before it changes the caption
    with torch.inference_mode():
        assert torch.allclose(clip.text_embeds(after, mask), base, atol=1e-6)
        assert not torch.allclose(clip.text_embeds(before, mask), base, atol=1e-4)
        assert torch.allclose(base.norm(dim=-1), torch.ones(1))


def _user_folder(path):
    """A folder as a user would bring one: a CLIPModel with its own word-level tokenizer."""
    words = ["<pad>", "<s>", "a", "small", "red", "circle", "big", "blue", "square", "</s>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 9)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=8)  # fmt: skip

    class Words:  # what clip_config reads of a tokenizer
        vocab_size, text_len, pad_id, bos_id, eos_id, hf = len(words), 8, 0, 1, 9, tok

    torch.manual_seed(1)
    from dalle_ar.models.clip import clip_config

    CLIPModel(clip_config(TINY, Words)).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    image_processor(TINY.image_size).save_pretrained(str(path))
    return path


def test_a_clip_reading_more_text_than_its_tokenizer_s_says_nothing_of_it(shapes_captions, caplog):
    """A CLIP may read longer captions than the tokenizer it was built on (configs/tiny: 48
    against 16): transformers' over-length warning, sized to the tokenizer, would be wrong."""
    tok = train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=8))
    clip = CLIP.build(dataclasses.replace(TINY, text_len=32), tok)
    with caplog.at_level(logging.WARNING):
        ids, mask = clip.encode_text(["a small red circle left of a big blue square"])
    assert ids.shape == (1, 32) and int(mask.sum()) > 8 and clip.too_long == 0
    assert "longer than the specified maximum" not in caplog.text


def test_a_users_folder_loads_and_scores(tmp_path):
    clip = CLIP.from_pretrained(_user_folder(tmp_path / "user"))
    assert clip.eos_id == 9 and clip.text_len == 8
    scores = clip.score(IMAGES, PROMPTS)
    assert scores.shape == (2,) and bool((scores >= 0).all())
    # 7 words + BOS + EOS do not fit in 8 positions: refused, never cut silently
    with pytest.raises(ValueError, match=r"encodes 'a small red circle a big blue' in 9 tokens"):
        clip.score(IMAGES[:1], ["a small red circle a big blue"])


def test_an_incomplete_folder_or_bad_input_is_refused_by_name(tmp_path, ours):
    folder = _user_folder(tmp_path / "user")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config.json \(the image"):
        CLIP.from_pretrained(folder)
    clip, _ = ours
    with pytest.raises(ValueError, match="one prompt per image, got 2 images and 1 prompts"):
        clip.score(IMAGES, PROMPTS[:1])


def test_tensor_pixels_follow_the_folders_processor(ours):
    """A processor that resizes to 24 and crops 20 (as openai's resize 224 / crop 224 pattern,
    at toy size): the tensor path gives the processor's pixels, up to the resize kernels."""
    from transformers import CLIPImageProcessorPil

    clip, _ = ours
    clip = CLIP(clip.model, clip.tokenizer, CLIPImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20}))  # fmt: skip
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    wave = 0.5 + 0.5 * torch.sin(3 * torch.pi * x) * torch.cos(2 * torch.pi * y)
    smooth = torch.stack([wave, y, (x + y) / 2])[None]  # (1, 3, 40, 48) in [0, 1]
    pil = Image.fromarray(smooth[0].mul(255).round().byte().permute(1, 2, 0).numpy())
    a, b = clip.pixels([pil]), clip.pixels_from_tensor(smooth.mul(255).round().div(255))
    assert a.shape == b.shape == (1, 3, 20, 20)
    squashed = clip.pixels_from_tensor(torch.nn.functional.interpolate(smooth, size=(20, 20)))
    ours, wrong = (a - b).abs().mean(), (a - squashed).abs().mean()  # wrong: no crop
    assert ours < 0.06 and ours < wrong / 2


def test_padding_to_the_longest_prompt_gives_the_same_embeddings(ours):
    clip, _ = ours
    full, short = clip.encode_text(PROMPTS), clip.encode_text(PROMPTS, longest=True)
    assert short[0].shape[1] < full[0].shape[1] == clip.text_len
    assert torch.allclose(clip.text_embeds(*short), clip.text_embeds(*full), atol=1e-5)


def test_identity_survives_a_round_trip_and_names_another_clip(ours, tmp_path):
    clip, tok = ours
    ident = clip.identity()
    assert ident["embed_dim"] == TINY.embed_dim
    clip.save_pretrained(tmp_path / "clip")
    assert CLIP.from_pretrained(tmp_path / "clip").identity() == ident
    other = CLIP.build(TINY, tok, seed=1).identity()  # same shape, other weights
    assert other["config_sha256"] == ident["config_sha256"]
    assert other["weights_sha256"] != ident["weights_sha256"]
